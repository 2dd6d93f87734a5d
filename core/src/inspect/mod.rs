//! The quantization error inspector: how far `dequantize_4bit(quantize_4bit(w))` lands from `w`
//! for a set of 4-bit configurations (NF4/FP4, block size, double quant), computed with the
//! bit-exact quantizer of [`crate::quant`].
//!
//! - [`inspect_tensor`]: everything about one tensor — per configuration the error summary, the
//!   code levels to overlay on the weight histogram, the error histogram and the histogram of
//!   per-block relative errors ([`TensorReport`]).
//! - [`summarize_tensor`] + [`ModelReport::new`]: the summaries (no histograms) of every
//!   quantized weight of a model, totals per configuration and SQNR heat maps layer × module.
//!
//! - [`quantized_weights`], [`with_weights`], [`SourceTensor`]: which weights of a checkpoint
//!   to inspect, read with errors that name the file and the tensor.
//! - [`TensorInspection`], [`ModelInspection`]: the same work in steps, for a caller that must
//!   stay responsive (the web page).
//! - [`tensor_figures`], [`model_figures`]: the SVG charts of a report.
//!
//! Every result type is serde-serializable; [`InspectReport`] is the JSON document the CLI
//! writes (`stats.json`) and the web page offers for download.

mod figures;
mod histogram;
mod model;
mod plot;
mod source;
mod stats;
mod tensor;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::quant::QuantType;

pub use figures::{model_figures, tensor_figures, Figure};
pub use histogram::Histogram;
pub use model::{
    summarize_tensor, ConfigTotal, HeatMap, LinearLocation, ModelReport, TensorSummary,
};
pub use source::{quantized_weights, with_weights, ModelInspection, SourceTensor};
pub use stats::{ErrorSummary, Quantiles, Sqnr};
pub use tensor::{inspect_tensor, ConfigDetail, TensorInspection, TensorReport, WeightStats};

/// The block sizes inspected when none are asked for.
pub const DEFAULT_BLOCKSIZES: [usize; 3] = [64, 128, 256];

/// Histogram bins when none are asked for: odd, so that a symmetric range has a bin centred on
/// zero (where exact reconstructions and all-zero blocks pile up).
pub const DEFAULT_BINS: usize = 101;

/// One 4-bit configuration: what `BitsAndBytesConfig(bnb_4bit_quant_type, blocksize,
/// bnb_4bit_use_double_quant)` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantConfig {
    #[serde(with = "quant_type_name")]
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub double_quant: bool,
}

impl QuantConfig {
    /// A short label: `nf4 bs64`, `fp4 bs128 dq`.
    pub fn label(&self) -> String {
        format!(
            "{} bs{}{}",
            self.quant_type,
            self.blocksize,
            if self.double_quant { " dq" } else { "" }
        )
    }
}

/// NF4 and FP4 at each block size, without and with double quant: for each block size, for
/// each double-quant setting, NF4 then FP4 (so the two types sit side by side).
pub fn quant_configs(blocksizes: &[usize]) -> Vec<QuantConfig> {
    blocksizes
        .iter()
        .flat_map(|&blocksize| {
            [false, true].into_iter().flat_map(move |double_quant| {
                [QuantType::Nf4, QuantType::Fp4].map(|quant_type| QuantConfig {
                    quant_type,
                    blocksize,
                    double_quant,
                })
            })
        })
        .collect()
}

/// The document `qlora inspect` writes: one tensor in full, or a whole model's summaries.
/// In JSON, `{"kind": "tensor", ...TensorReport fields}` or `{"kind": "model", ...ModelReport
/// fields}`; a configuration is `{"quant_type": "nf4", "blocksize": 64, "double_quant": true}`,
/// an SQNR `{"db": 20.7}`, `"lossless"` or `"no_signal"`, a histogram `{"lo", "hi", "counts",
/// "outside"}` with equal-width bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InspectReport {
    Tensor(TensorReport),
    Model(ModelReport),
}

/// `QuantType` as its bitsandbytes name (`"nf4"`, `"fp4"`).
mod quant_type_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::quant::QuantType;

    pub fn serialize<S: Serializer>(q: &QuantType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(q.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<QuantType, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}
