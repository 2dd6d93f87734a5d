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
    TensorInspection::new(name, input, shape, configs, bins)?.finish()
}

/// [`inspect_tensor`] one quantization at a time, so that a caller can pause between steps
/// (the web page yields to the browser there and shows progress). Two steps per
/// configuration: first each one's summary, relative errors and code scale; then, once the
/// shared range (the largest error of any configuration) is known, each one's histograms.
pub struct TensorInspection<'a> {
    name: String,
    input: FloatSlice<'a>,
    shape: Vec<usize>,
    configs: Vec<QuantConfig>,
    bins: usize,
    weights: Vec<f32>,
    /// Per configuration inspected so far: summary, block relative errors, code scale.
    measured: Vec<(ErrorSummary, Vec<f64>, f64)>,
    details: Vec<ConfigDetail>,
}

impl<'a> TensorInspection<'a> {
    /// Checks the values (all finite); the quantizations wait for [`Self::step`].
    pub fn new(
        name: &str,
        input: FloatSlice<'a>,
        shape: &[usize],
        configs: &[QuantConfig],
        bins: usize,
    ) -> Result<Self> {
        Ok(TensorInspection {
            name: name.to_string(),
            input,
            shape: shape.to_vec(),
            configs: configs.to_vec(),
            bins,
            weights: widen_finite(input)?,
            measured: Vec::with_capacity(configs.len()),
            details: Vec::with_capacity(configs.len()),
        })
    }

    pub fn steps(&self) -> usize {
        2 * self.configs.len()
    }

    pub fn steps_done(&self) -> usize {
        self.measured.len() + self.details.len()
    }

    /// Runs the next step; nothing once all are done.
    pub fn step(&mut self) -> Result<()> {
        if let Some(&config) = self.configs.get(self.measured.len()) {
            let rec = reconstruct(self.input, &self.shape, config)?;
            let (summary, rel_errors) = measure(&self.weights, &rec, config);
            self.measured
                .push((summary, rel_errors, median_nonzero(rec.absmax)));
            return Ok(());
        }
        let Some((summary, rel_errors, code_scale)) = self.measured.get(self.details.len()) else {
            return Ok(());
        };
        let error_extent = self
            .measured
            .iter()
            .map(|(s, _, _)| s.max_abs_error)
            .fold(0.0, f64::max);
        let rel_extent = self
            .measured
            .iter()
            .filter_map(|(s, _, _)| s.block_rel_error.map(|q| q.max))
            .fold(0.0, f64::max);
        // Quantizing again is deterministic and cheaper in memory than keeping every
        // configuration's reconstruction.
        let rec = reconstruct(self.input, &self.shape, summary.config)?;
        let (w, d) = (&self.weights, &rec.dequantized);
        let error_histogram =
            Histogram::fill(w.len(), -error_extent, error_extent, self.bins, |i| {
                w[i] as f64 - d[i] as f64
            });
        self.details.push(ConfigDetail {
            code_levels: codebook(summary.config.quant_type)
                .iter()
                .map(|&c| c as f64 * code_scale)
                .collect(),
            code_scale: *code_scale,
            error_histogram,
            block_rel_error_histogram: Histogram::of(rel_errors, 0.0, rel_extent, self.bins),
            summary: summary.clone(),
        });
        Ok(())
    }

    /// Runs the steps left and returns the report.
    pub fn finish(mut self) -> Result<TensorReport> {
        while self.steps_done() < self.steps() {
            self.step()?;
        }
        let stats = weight_stats(&self.weights);
        let weights = &self.weights;
        Ok(TensorReport {
            weight_histogram: Histogram::fill(
                weights.len(),
                -stats.absmax,
                stats.absmax,
                self.bins,
                |i| weights[i] as f64,
            ),
            name: self.name,
            shape: self.shape,
            dtype: self.input.dtype(),
            weights: stats,
            configs: self.details,
        })
    }
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
