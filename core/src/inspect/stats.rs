//! The error of one configuration on one tensor: quantize and dequantize with the bit-exact
//! quantizer, then reduce `e = w - ŵ` block by block (in f64, in parallel over blocks).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::QuantConfig;
use crate::quant::{dequantize_4bit, quantize_4bit, FloatSlice};
use crate::{Error, Result};

/// Signal-to-quantization-noise ratio `10·log10(Σw² / Σ(w−ŵ)²)`, with the two cases where the
/// ratio is not a finite number kept apart rather than left as inf/NaN (which JSON cannot hold).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sqnr {
    /// A finite ratio, in dB: `{"db": 20.1}` in JSON.
    Db(f64),
    /// The reconstruction is exact and the tensor is not all zero: +∞ dB.
    Lossless,
    /// The tensor is all zero, so there is no signal: 0/0 when the reconstruction is exact too,
    /// −∞ dB otherwise (the MSE says which).
    NoSignal,
}

impl Sqnr {
    /// From the sums of squares of the weights (`signal`) and of the errors (`noise`).
    pub fn from_sums(signal: f64, noise: f64) -> Sqnr {
        if signal == 0.0 {
            Sqnr::NoSignal
        } else if noise == 0.0 {
            Sqnr::Lossless
        } else {
            Sqnr::Db(10.0 * (signal / noise).log10())
        }
    }

    /// As a plain number, for plotting: +∞ when lossless, NaN without signal.
    pub fn db(self) -> f64 {
        match self {
            Sqnr::Db(db) => db,
            Sqnr::Lossless => f64::INFINITY,
            Sqnr::NoSignal => f64::NAN,
        }
    }
}

/// Quantiles by linear interpolation between order statistics (numpy's default method).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Quantiles {
    /// `None` for no values.
    pub fn of(mut values: Vec<f64>) -> Option<Quantiles> {
        values.sort_unstable_by(f64::total_cmp);
        let at = |p: f64| {
            let h = (values.len() - 1) as f64 * p;
            let (lo, frac) = (h.floor() as usize, h - h.floor());
            let hi = (lo + 1).min(values.len() - 1);
            values[lo] + frac * (values[hi] - values[lo])
        };
        (!values.is_empty()).then(|| Quantiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: values[values.len() - 1],
        })
    }
}

/// The error of one configuration on one tensor, `e = w − dequantize_4bit(quantize_4bit(w))`
/// over its `numel` elements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorSummary {
    pub config: QuantConfig,
    pub numel: usize,
    /// `Σe² / numel`.
    pub mse: f64,
    /// `Σ|e| / numel`.
    pub mean_abs_error: f64,
    /// `max |e|`.
    pub max_abs_error: f64,
    /// `Σw² / numel`, the signal power SQNR compares the MSE with.
    pub mean_square_weight: f64,
    pub sqnr: Sqnr,
    /// Blocks of `blocksize` consecutive elements (row-major), the last possibly shorter.
    pub blocks: usize,
    /// Blocks whose weights are all zero: left out of `block_rel_error` (0/0).
    pub zero_blocks: usize,
    /// Quantiles of `‖w−ŵ‖₂ / ‖w‖₂` over the other blocks; `None` when every block is zero.
    pub block_rel_error: Option<Quantiles>,
}

/// What a configuration makes of a tensor.
pub(crate) struct Reconstruction {
    /// `dequantize_4bit(quantize_4bit(w))`, widened to f32.
    pub dequantized: Vec<f32>,
    /// Each block's absmax as dequantization uses it (after double quant, where on).
    pub absmax: Vec<f32>,
}

pub(crate) fn reconstruct(
    input: FloatSlice<'_>,
    shape: &[usize],
    config: QuantConfig,
) -> Result<Reconstruction> {
    let q = quantize_4bit(
        input,
        shape,
        config.quant_type,
        config.blocksize,
        config.double_quant,
    )?;
    Ok(Reconstruction {
        dequantized: dequantize_4bit(&q)?,
        absmax: q.absmax.to_f32()?,
    })
}

/// The input widened to f32 (exactly), refusing NaN and infinities: their error is undefined
/// and would turn every sum into NaN.
pub(crate) fn widen_finite(input: FloatSlice<'_>) -> Result<Vec<f32>> {
    let values: Vec<f32> = match input {
        FloatSlice::F32(v) => v.to_vec(),
        FloatSlice::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        FloatSlice::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
    };
    let bad = values.iter().filter(|x| !x.is_finite()).count();
    if let Some(first) = values.iter().position(|x| !x.is_finite()) {
        return Err(Error::Invalid(format!(
            "{bad} of {} values are not finite (the first at flat index {first}: {}); \
             the quantization error is undefined",
            values.len(),
            values[first]
        )));
    }
    Ok(values)
}

/// Sums over one block, in f64.
#[derive(Debug, Clone, Copy, Default)]
struct BlockSums {
    signal: f64,
    noise: f64,
    abs_error: f64,
    max_abs_error: f64,
}

impl BlockSums {
    fn of(weights: &[f32], dequantized: &[f32]) -> BlockSums {
        weights
            .iter()
            .zip(dequantized)
            .fold(BlockSums::default(), |s, (&w, &d)| {
                // In f64, where the difference of two f32 is (all but always) exact.
                let (w, e) = (w as f64, w as f64 - d as f64);
                BlockSums {
                    signal: s.signal + w * w,
                    noise: s.noise + e * e,
                    abs_error: s.abs_error + e.abs(),
                    max_abs_error: s.max_abs_error.max(e.abs()),
                }
            })
    }
}

/// The summary of `config` on `weights` (finite, row-major) given what it made of them, and
/// the relative error of every block that is not all zero, in block order.
pub(crate) fn measure(
    weights: &[f32],
    rec: &Reconstruction,
    config: QuantConfig,
) -> (ErrorSummary, Vec<f64>) {
    let blocks: Vec<BlockSums> = weights
        .par_chunks(config.blocksize)
        .zip(rec.dequantized.par_chunks(config.blocksize))
        .map(|(w, d)| BlockSums::of(w, d))
        .collect();
    let total = blocks.iter().fold(BlockSums::default(), |t, b| BlockSums {
        signal: t.signal + b.signal,
        noise: t.noise + b.noise,
        abs_error: t.abs_error + b.abs_error,
        max_abs_error: t.max_abs_error.max(b.max_abs_error),
    });
    let rel_errors: Vec<f64> = blocks
        .iter()
        .filter(|b| b.signal > 0.0)
        .map(|b| (b.noise / b.signal).sqrt())
        .collect();
    let n = weights.len() as f64;
    let summary = ErrorSummary {
        config,
        numel: weights.len(),
        mse: total.noise / n,
        mean_abs_error: total.abs_error / n,
        max_abs_error: total.max_abs_error,
        mean_square_weight: total.signal / n,
        sqnr: Sqnr::from_sums(total.signal, total.noise),
        blocks: blocks.len(),
        zero_blocks: blocks.len() - rel_errors.len(),
        block_rel_error: Quantiles::of(rel_errors.clone()),
    };
    (summary, rel_errors)
}
