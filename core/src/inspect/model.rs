//! A whole model: the error summaries of every quantized weight, totals per configuration, and
//! SQNR heat maps layer × module.

use serde::{Deserialize, Serialize};

use super::stats::{measure, reconstruct, widen_finite};
use super::{ErrorSummary, QuantConfig, Sqnr};
use crate::quant::FloatSlice;
use crate::{DType, Result};

/// Where a linear weight sits in the model, read from its checkpoint name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearLocation {
    /// The first purely numeric dotted component (`transformer.h.3.…`, `model.layers.3.…`).
    pub layer: Option<usize>,
    /// The component before the last: `query_key_value` of `….query_key_value.weight`.
    pub module: String,
}

impl LinearLocation {
    pub fn from_name(name: &str) -> LinearLocation {
        let parts: Vec<&str> = name.split('.').collect();
        LinearLocation {
            layer: parts.iter().find_map(|p| p.parse().ok()),
            module: match parts.len() {
                0 | 1 => name.to_string(),
                n => parts[n - 2].to_string(),
            },
        }
    }
}

/// The summaries (no histograms) of one tensor, one per configuration, in the model's order
/// of configurations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSummary {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    #[serde(flatten)]
    pub location: LinearLocation,
    pub configs: Vec<ErrorSummary>,
}

/// The error summary of each configuration on one tensor (`input` row-major with `shape`,
/// quantized in its own dtype). Errors as [`super::inspect_tensor`] does.
pub fn summarize_tensor(
    name: &str,
    input: FloatSlice<'_>,
    shape: &[usize],
    configs: &[QuantConfig],
) -> Result<TensorSummary> {
    let weights = widen_finite(input)?;
    let configs = configs
        .iter()
        .map(|&config| Ok(measure(&weights, &reconstruct(input, shape, config)?, config).0))
        .collect::<Result<Vec<_>>>()?;
    Ok(TensorSummary {
        name: name.to_string(),
        shape: shape.to_vec(),
        dtype: input.dtype(),
        location: LinearLocation::from_name(name),
        configs,
    })
}

/// One configuration over all the model's quantized weights together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigTotal {
    pub config: QuantConfig,
    pub numel: usize,
    /// `Σe² / Σnumel` over every tensor.
    pub mse: f64,
    /// `10·log10(Σw² / Σe²)` over every tensor.
    pub sqnr: Sqnr,
}

/// SQNR of one configuration by layer (rows) and module (columns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeatMap {
    pub config: QuantConfig,
    /// Row labels, ascending.
    pub layers: Vec<usize>,
    /// Column labels, in the order the modules first appear in the model.
    pub modules: Vec<String>,
    /// `sqnr[row][column]`; `None` where the layer has no such module.
    pub sqnr: Vec<Vec<Option<Sqnr>>>,
}

/// The model's summaries with their totals and heat maps (one per configuration; tensors with
/// no layer number stay out of the heat maps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    pub configs: Vec<QuantConfig>,
    pub tensors: Vec<TensorSummary>,
    pub totals: Vec<ConfigTotal>,
    pub heat_maps: Vec<HeatMap>,
}

impl ModelReport {
    pub fn new(configs: Vec<QuantConfig>, tensors: Vec<TensorSummary>) -> ModelReport {
        let summaries = |config: QuantConfig| {
            tensors.iter().filter_map(move |t| {
                let s = t.configs.iter().find(|s| s.config == config)?;
                Some((t, s))
            })
        };
        let totals = configs
            .iter()
            .map(|&config| {
                let (mut numel, mut signal, mut noise) = (0usize, 0.0, 0.0);
                for (_, s) in summaries(config) {
                    numel += s.numel;
                    signal += s.mean_square_weight * s.numel as f64;
                    noise += s.mse * s.numel as f64;
                }
                ConfigTotal {
                    config,
                    numel,
                    mse: if numel == 0 {
                        0.0
                    } else {
                        noise / numel as f64
                    },
                    sqnr: Sqnr::from_sums(signal, noise),
                }
            })
            .collect();

        let mut layers: Vec<usize> = tensors.iter().filter_map(|t| t.location.layer).collect();
        layers.sort_unstable();
        layers.dedup();
        let mut modules: Vec<String> = Vec::new();
        for t in tensors.iter().filter(|t| t.location.layer.is_some()) {
            if !modules.contains(&t.location.module) {
                modules.push(t.location.module.clone());
            }
        }
        let heat_maps = configs
            .iter()
            .map(|&config| {
                let mut sqnr = vec![vec![None; modules.len()]; layers.len()];
                for (t, s) in summaries(config) {
                    let Some(layer) = t.location.layer else {
                        continue;
                    };
                    let row = layers.binary_search(&layer).expect("collected above");
                    let column = modules
                        .iter()
                        .position(|m| *m == t.location.module)
                        .expect("collected above");
                    sqnr[row][column] = Some(s.sqnr);
                }
                HeatMap {
                    config,
                    layers: layers.clone(),
                    modules: modules.clone(),
                    sqnr,
                }
            })
            .collect();
        ModelReport {
            configs,
            tensors,
            totals,
            heat_maps,
        }
    }
}
