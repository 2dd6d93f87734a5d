//! How far the merged model is from the base + adapter it came from: the logits of both on a few
//! prompts, and (for a 4-bit output) how much re-quantization moved the merged weights, with
//! the inspector's statistics ([`qlora_core::inspect`]).

use candle_core::{Device, Tensor};
use qlora_core::inspect::ModelReport;
use qlora_core::tokenizer::Tokenizer;
use qlora_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::cpu::{compute_error, Mode, Model};
use crate::generate::sampling::argmax;

/// The prompts compared when none are given: short, in the two languages of the target data.
pub const DEFAULT_PROMPTS: [&str; 3] = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "请用一句话介绍一下你自己。",
];

/// `merge_report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeReport {
    pub base: String,
    pub adapter: String,
    /// Whether the base was a 4-bit checkpoint, merged into after dequantization.
    pub base_was_4bit: bool,
    /// The factor on `B·A`.
    pub scale: f64,
    /// The weights the adapter was merged into.
    pub merged_weights: Vec<String>,
    /// `float32`, `bfloat16`, ... for a full-precision output; `nf4` or `fp4` for a 4-bit one.
    pub output_format: String,
    /// 4-bit output only: every quantized weight, merged `w` against
    /// `dequantize_4bit(quantize_4bit(w))` as written.
    pub requantization: Option<ModelReport>,
    pub logits: LogitsComparison,
}

/// The logits of the merged model against those of base + adapter on one prompt, over every
/// position of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLogits {
    pub prompt: String,
    pub tokens: usize,
    /// `max |merged − unmerged|` over positions and vocabulary.
    pub max_abs_diff: f64,
    /// `mean |merged − unmerged|` over positions and vocabulary.
    pub mean_abs_diff: f64,
    /// Positions whose argmax (first on ties) is the same, as a fraction of `tokens`.
    pub top1_agreement: f64,
}

/// Every prompt, and all of them together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogitsComparison {
    pub prompts: Vec<PromptLogits>,
    pub max_abs_diff: f64,
    /// Over every logit of every prompt.
    pub mean_abs_diff: f64,
    /// Over every position of every prompt.
    pub top1_agreement: f64,
}

impl LogitsComparison {
    pub fn new(prompts: Vec<PromptLogits>) -> LogitsComparison {
        let positions: usize = prompts.iter().map(|p| p.tokens).sum();
        let weighted = |f: fn(&PromptLogits) -> f64| {
            prompts.iter().map(|p| f(p) * p.tokens as f64).sum::<f64>() / positions.max(1) as f64
        };
        LogitsComparison {
            max_abs_diff: prompts.iter().map(|p| p.max_abs_diff).fold(0.0, f64::max),
            // Every position has the same number of logits, so weighting by positions is the
            // mean over logits.
            mean_abs_diff: weighted(|p| p.mean_abs_diff),
            top1_agreement: weighted(|p| p.top1_agreement),
            prompts,
        }
    }
}

/// The ids a prompt is compared on: BOS first where the tokenizer adds one, then the text
/// (special tokens written in it parsed).
pub fn prompt_ids(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = tokenizer
        .bos_id()
        .filter(|_| tokenizer.add_bos())
        .into_iter()
        .collect();
    ids.extend(tokenizer.encode(prompt, true)?);
    if ids.is_empty() {
        return Err(Error::Invalid(format!(
            "the prompt {prompt:?} has no tokens"
        )));
    }
    Ok(ids)
}

/// The logits `[T, vocab]` (row-major) of `ids` in one forward pass, without autograd.
pub fn logits(model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    let input =
        Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).map_err(compute_error)?;
    model
        .forward(&input, None, &mut Mode::Inference)?
        .flatten_all()
        .and_then(|l| l.to_vec1())
        .map_err(compute_error)
}

/// Compares `merged` with `unmerged` logits, both `[tokens, vocab]` row-major.
pub fn compare(prompt: &str, vocab: usize, unmerged: &[f32], merged: &[f32]) -> PromptLogits {
    assert_eq!(unmerged.len(), merged.len(), "logits of one prompt");
    let tokens = unmerged.len() / vocab.max(1);
    let (mut max, mut sum) = (0.0f64, 0.0f64);
    for (&u, &m) in unmerged.iter().zip(merged) {
        let d = (m as f64 - u as f64).abs();
        max = max.max(d);
        sum += d;
    }
    let agree = unmerged
        .chunks_exact(vocab)
        .zip(merged.chunks_exact(vocab))
        .filter(|(u, m)| argmax(u) == argmax(m))
        .count();
    PromptLogits {
        prompt: prompt.to_string(),
        tokens,
        max_abs_diff: max,
        mean_abs_diff: sum / unmerged.len().max(1) as f64,
        top1_agreement: agree as f64 / tokens.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_and_agreement_over_positions() {
        // Two positions, vocabulary 3: the first agrees on its argmax, the second does not.
        let unmerged = [1.0, 3.0, 2.0, 0.0, 1.0, 2.0];
        let merged = [1.5, 3.0, 2.0, 0.0, 3.0, 2.0];
        let p = compare("p", 3, &unmerged, &merged);
        assert_eq!(p.tokens, 2);
        assert_eq!(p.max_abs_diff, 2.0);
        assert!((p.mean_abs_diff - 2.5 / 6.0).abs() < 1e-12);
        assert_eq!(p.top1_agreement, 0.5);

        let q = compare("q", 3, &unmerged[..3], &unmerged[..3]);
        let all = LogitsComparison::new(vec![p, q]);
        assert_eq!(all.max_abs_diff, 2.0);
        assert!((all.mean_abs_diff - 2.5 / 9.0).abs() < 1e-12);
        assert!((all.top1_agreement - 2.0 / 3.0).abs() < 1e-12);
    }
}
