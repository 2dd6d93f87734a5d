//! Everything about one tensor: weight statistics and histogram, and per configuration the
//! error summary, the code levels at the tensor's scale and the error histograms.

use serde::{Deserialize, Serialize};

use super::stats::{measure, reconstruct, widen_finite};
use super::{ErrorSummary, Histogram, QuantConfig};
use crate::quant::{codebook, FloatSlice};
use crate::{DType, Result};

/// Plain statistics of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WeightStats {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// `max |w|`.
    pub absmax: f64,
}

/// One configuration on one tensor, with what plotting it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigDetail {
    pub summary: ErrorSummary,
    /// The tensor's typical block absmax: the median over the blocks with a non-zero absmax,
    /// taking each block's absmax as dequantization uses it (after double quant, where on);
    /// 0 when every block is zero.
    pub code_scale: f64,
    /// The 16 values a typical block can take, `codebook[i] × code_scale` by code `i`, to
    /// overlay on the weight histogram.
    pub code_levels: Vec<f64>,
    /// Histogram of `w − ŵ` over the report's shared error range.
    pub error_histogram: Histogram,
    /// Histogram of the per-block relative errors `‖w−ŵ‖₂/‖w‖₂` (all-zero blocks left out)
    /// over the report's shared range.
    pub block_rel_error_histogram: Histogram,
}

/// One tensor in full. Histograms of the same kind share their range across configurations:
/// weights over `[−absmax, absmax]`, errors over `[−E, E]` with `E` the largest `max_abs_error`
/// of any configuration, relative errors over `[0, R]` with `R` the largest block relative error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorReport {
    pub name: String,
    pub shape: Vec<usize>,
    /// The dtype the tensor was quantized from (dequantized values are rounded to it).
    pub dtype: DType,
    pub weights: WeightStats,
    pub weight_histogram: Histogram,
    pub configs: Vec<ConfigDetail>,
}

/// Inspects one tensor (`input` row-major with `shape`, quantized in its own dtype as
/// transformers does) under every configuration of `configs`, with histograms of `bins` bins.
/// Errors on a shape that does not match, a block size bitsandbytes does not take, or a value
/// that is not finite.
pub fn inspect_tensor(
    name: &str,
    input: FloatSlice<'_>,
    shape: &[usize],
    configs: &[QuantConfig],
    bins: usize,
) -> Result<TensorReport> {
    let weights = widen_finite(input)?;
    // First pass: summaries, relative errors and code scales; the error histograms wait until
    // the shared range (the largest error of any configuration) is known.
    let mut measured = Vec::with_capacity(configs.len());
    for &config in configs {
        let rec = reconstruct(input, shape, config)?;
        let (summary, rel_errors) = measure(&weights, &rec, config);
        measured.push((summary, rel_errors, median_nonzero(rec.absmax)));
    }
    let error_extent = measured
        .iter()
        .map(|(s, _, _)| s.max_abs_error)
        .fold(0.0, f64::max);
    let rel_extent = measured
        .iter()
        .filter_map(|(s, _, _)| s.block_rel_error.map(|q| q.max))
        .fold(0.0, f64::max);

    let mut details = Vec::with_capacity(configs.len());
    for (summary, rel_errors, code_scale) in measured {
        // Quantizing again is deterministic and cheaper in memory than keeping every
        // configuration's reconstruction.
        let rec = reconstruct(input, shape, summary.config)?;
        let (w, d) = (&weights, &rec.dequantized);
        let error_histogram = Histogram::fill(w.len(), -error_extent, error_extent, bins, |i| {
            w[i] as f64 - d[i] as f64
        });
        details.push(ConfigDetail {
            code_levels: codebook(summary.config.quant_type)
                .iter()
                .map(|&c| c as f64 * code_scale)
                .collect(),
            code_scale,
            error_histogram,
            block_rel_error_histogram: Histogram::of(&rel_errors, 0.0, rel_extent, bins),
            summary,
        });
    }
    let stats = weight_stats(&weights);
    Ok(TensorReport {
        name: name.to_string(),
        shape: shape.to_vec(),
        dtype: input.dtype(),
        weight_histogram: Histogram::fill(weights.len(), -stats.absmax, stats.absmax, bins, |i| {
            weights[i] as f64
        }),
        weights: stats,
        configs: details,
    })
}

/// The median (lower middle for an even count) of the non-zero values; 0 when there are none.
fn median_nonzero(mut values: Vec<f32>) -> f64 {
    values.retain(|&v| v != 0.0);
    if values.is_empty() {
        return 0.0;
    }
    let mid = (values.len() - 1) / 2;
    *values.select_nth_unstable_by(mid, f32::total_cmp).1 as f64
}

fn weight_stats(weights: &[f32]) -> WeightStats {
    let n = weights.len() as f64;
    let (mut min, mut max, mut sum) = (f64::INFINITY, f64::NEG_INFINITY, 0.0);
    for &w in weights {
        let w = w as f64;
        min = min.min(w);
        max = max.max(w);
        sum += w;
    }
    let mean = sum / n;
    let var = weights
        .iter()
        .map(|&w| (w as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    WeightStats {
        min,
        max,
        mean,
        std: var.sqrt(),
        absmax: max.abs().max(min.abs()),
    }
}
