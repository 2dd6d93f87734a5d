//! Greedy decoding by re-evaluating the whole sequence at every step, without a cache: the
//! slow, obviously-correct reference the cached loop and the CUDA / WGSL paths are checked against.

use super::sampling::{apply_repetition_penalty, argmax};
use crate::cpu::{compute_error, Mode, Model};
use candle_core::{Device, IndexOp, Tensor};
use qlora_core::Result;

/// Up to `max_new_tokens` ids after `prompt`, each the argmax (first on ties) of the last-position
/// logits of a full [`Model::forward`] over prompt + ids so far, after transformers' repetition
/// penalty (1.0: none); stops before a `stop_ids` token.
pub fn greedy_reference(
    model: &Model,
    prompt: &[u32],
    max_new_tokens: usize,
    repetition_penalty: f32,
    stop_ids: &[u32],
) -> Result<Vec<u32>> {
    let mut sequence = prompt.to_vec();
    for _ in 0..max_new_tokens {
        let t = sequence.len();
        let ids =
            Tensor::from_vec(sequence.clone(), (1, t), &Device::Cpu).map_err(compute_error)?;
        let logits = model.forward(&ids, None, &mut Mode::Inference)?;
        let mut last: Vec<f32> = logits
            .i((0, t - 1))
            .and_then(|l| l.to_vec1())
            .map_err(compute_error)?;
        apply_repetition_penalty(&mut last, &sequence, repetition_penalty);
        let token = argmax(&last);
        if stop_ids.contains(&token) {
            break;
        }
        sequence.push(token);
    }
    Ok(sequence.split_off(prompt.len()))
}
