//! The causal language-modelling loss, as transformers' `ForCausalLMLoss` computes it.

use super::ops::log_softmax_last_dim;
use candle_core::{DType, Device, Tensor};
use qlora_core::{Error, Result};

/// The label value that marks a position without a target (prompt, padding).
pub const IGNORE_INDEX: i64 = -100;

/// Mean next-token cross-entropy of `logits` `[B, T, V]` against `labels` `[B, T]` (integer ids,
/// `-100` = ignored): position `t` predicts `labels[t + 1]`, the mean is over the predicted
/// (non-ignored) positions, in f32. A scalar tensor that back-propagates into the logits.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (batch, seq, vocab) = logits.dims3().map_err(|_| {
        Error::Invalid(format!(
            "logits: expected [batch, seq, vocab], got {:?}",
            logits.dims()
        ))
    })?;
    if labels.dims() != [batch, seq] {
        return Err(Error::Invalid(format!(
            "labels have shape {:?}, logits {:?}",
            labels.dims(),
            logits.dims()
        )));
    }
    if seq < 2 {
        return Err(Error::Invalid(format!(
            "a sequence of {seq} token(s) has no next token to predict"
        )));
    }
    if !labels.dtype().is_int() {
        return Err(Error::Invalid(format!(
            "labels: dtype {:?} is not an integer type",
            labels.dtype()
        )));
    }
    let labels: Vec<i64> = labels
        .to_dtype(DType::I64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(super::compute_error)?;
    // Targets of positions 0..T-1: the labels of positions 1..T. An ignored position gets target
    // 0 and weight 0.
    let predicted = seq - 1;
    let mut targets = Vec::with_capacity(batch * predicted);
    let mut weights = Vec::with_capacity(batch * predicted);
    for row in labels.chunks_exact(seq) {
        for &label in &row[1..] {
            if label == IGNORE_INDEX {
                targets.push(0u32);
                weights.push(0f32);
            } else if (0..vocab as i64).contains(&label) {
                targets.push(label as u32);
                weights.push(1f32);
            } else {
                return Err(Error::Invalid(format!(
                    "label {label} is neither -100 nor a token id below {vocab}"
                )));
            }
        }
    }
    let count = weights.iter().filter(|&&w| w > 0.0).count();
    if count == 0 {
        return Err(Error::Invalid(
            "every label is -100: there is nothing to predict".into(),
        ));
    }
    let compute = || -> candle_core::Result<Tensor> {
        let rows = batch * predicted;
        let logits = logits.narrow(1, 0, predicted)?.reshape((rows, vocab))?; // [N, V]
        let log_probs = log_softmax_last_dim(&logits.to_dtype(DType::F32)?)?; // [N, V]
        let targets = Tensor::from_vec(targets, (rows, 1), &Device::Cpu)?;
        let picked = log_probs.gather(&targets, 1)?.reshape(rows)?; // [N]
        let weights = Tensor::from_vec(weights, rows, &Device::Cpu)?;
        (picked * weights)?
            .sum_all()?
            .affine(-1.0 / count as f64, 0.0)
    };
    compute().map_err(super::compute_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_log_vocab_and_ignore_masked_labels() {
        let logits = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[5i64, 2, -100]], &Device::Cpu).unwrap();
        // label 5 at position 0 is never a target (nothing predicts position 0).
        let loss = causal_lm_loss(&logits, &labels).unwrap();
        assert!((loss.to_vec0::<f32>().unwrap() - 4f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn rejects_all_ignored_and_out_of_range_labels() {
        let logits = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu).unwrap();
        let ignored = Tensor::new(&[[1i64, -100]], &Device::Cpu).unwrap();
        assert!(causal_lm_loss(&logits, &ignored).is_err());
        let too_big = Tensor::new(&[[1i64, 4]], &Device::Cpu).unwrap();
        let err = causal_lm_loss(&logits, &too_big).unwrap_err();
        assert!(err.to_string().contains("label 4"), "{err}");
    }
}
