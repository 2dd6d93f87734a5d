//! The causal language-modelling loss, as transformers' `ForCausalLMLoss` computes it.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor};
use qlora_core::{Error, Result};
use rayon::prelude::*;

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
        logits
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1(MeanCrossEntropy {
                targets,
                weights,
                count: count as f64,
            })
    };
    compute().map_err(super::compute_error)
}

/// `sum_n weight[n] * (logsumexp(x[n]) - x[n, target[n]]) / count` over the rows of logits
/// `[N, V]`, with the gradient `weight[n] / count * (softmax(x[n]) - onehot(target[n]))`
/// computed in one pass per row (llm.c's fused classifier): the generic ops would keep several
/// `[N, V]` intermediates, and with a 50k vocabulary they dominated the backward pass.
struct MeanCrossEntropy {
    /// `[N]`
    targets: Vec<u32>,
    /// `[N]`: 1 for a predicted position, 0 for an ignored one.
    weights: Vec<f32>,
    count: f64,
}

impl MeanCrossEntropy {
    /// The max and `sum(exp(x - max))` of one row (the sum in f64).
    fn row_stats(row: &[f32]) -> (f32, f64) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = row.iter().map(|&x| f64::from((x - max).exp())).sum();
        (max, sum)
    }
}

/// The f32 values of a contiguous CPU storage.
fn contiguous_f32<'s>(storage: &'s CpuStorage, layout: &Layout) -> candle_core::Result<&'s [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("cross-entropy: logits must be f32");
    };
    if !layout.is_contiguous() {
        candle_core::bail!("cross-entropy: logits must be contiguous");
    }
    Ok(&values[layout.start_offset()..][..layout.shape().elem_count()])
}

impl CustomOp1 for MeanCrossEntropy {
    fn name(&self) -> &'static str {
        "mean-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, vocab) = layout.shape().dims2()?;
        let logits = contiguous_f32(storage, layout)?;
        let total: f64 = logits
            .par_chunks_exact(vocab)
            .zip(self.targets.par_iter().zip(&self.weights))
            .filter(|(_, (_, &weight))| weight > 0.0)
            .map(|(row, (&target, _))| {
                let (max, sum) = Self::row_stats(row);
                // -log softmax(row)[target] = max + ln(sum) - row[target]
                f64::from(max) + sum.ln() - f64::from(row[target as usize])
            })
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / self.count) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _loss: &Tensor,
        grad_loss: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rows, vocab) = logits.dims2()?;
        let grad_loss = f64::from(grad_loss.to_scalar::<f32>()?);
        let (storage, layout) = logits.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("cross-entropy: logits are not on the CPU");
        };
        let logits = contiguous_f32(storage, layout)?;
        let mut grad = vec![0f32; rows * vocab];
        grad.par_chunks_exact_mut(vocab)
            .zip(logits.par_chunks_exact(vocab))
            .zip(self.targets.par_iter().zip(&self.weights))
            .filter(|(_, (_, &weight))| weight > 0.0)
            .for_each(|((grad_row, row), (&target, &weight))| {
                let coefficient = grad_loss * f64::from(weight) / self.count;
                let (max, sum) = Self::row_stats(row);
                let scale = (coefficient / sum) as f32;
                for (g, &x) in grad_row.iter_mut().zip(row) {
                    *g = (x - max).exp() * scale;
                }
                grad_row[target as usize] -= coefficient as f32;
            });
        Ok(Some(Tensor::from_vec(grad, (rows, vocab), &Device::Cpu)?))
    }
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

    /// The fused gradient equals the one of the generic ops: `-mean(log_softmax(x)[t])`.
    #[test]
    fn fused_gradient_matches_autograd_of_log_softmax() {
        let values: Vec<f32> = (0..2 * 4 * 5)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let logits = candle_core::Var::from_vec(values, (2, 4, 5), &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[0i64, 1, -100, 4], [-100, 3, 2, 0]], &Device::Cpu).unwrap();
        let loss = causal_lm_loss(logits.as_tensor(), &labels).unwrap();
        let fused = loss.backward().unwrap();
        // The same loss from generic ops: rows (0,0->1), (0,2->4), (1,0->3), (1,1->2), (1,2->0).
        let x = logits.as_tensor();
        let log_probs = x
            .broadcast_sub(&x.exp().unwrap().sum_keepdim(2).unwrap().log().unwrap())
            .unwrap();
        let picked = [(0, 0, 1), (0, 2, 4), (1, 0, 3), (1, 1, 2), (1, 2, 0)]
            .iter()
            .map(|&(b, t, v)| log_probs.get(b).unwrap().get(t).unwrap().get(v).unwrap())
            .collect::<Vec<_>>();
        let reference =
            (Tensor::stack(&picked, 0).unwrap().sum_all().unwrap() * (-1.0 / 5.0)).unwrap();
        let reference_value: f32 = reference.to_scalar().unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - reference_value).abs() < 1e-6);
        let generic = reference.backward().unwrap();
        let fused: Vec<f32> = fused
            .get(x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let generic: Vec<f32> = generic
            .get(x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in fused.iter().zip(&generic) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
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
