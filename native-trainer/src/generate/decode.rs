//! The decoding loop: the prompts once through the model, then one token per row per step
//! through the KV cache.

use super::sampling::Sampler;
use crate::cpu::{compute_error, Model};
use candle_core::{Device, IndexOp, Tensor};
use qlora_core::{Error, Result};

/// When generation stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Tokens that end a row (EOS, an end-of-turn token); they are not part of the output.
    pub stop_ids: Vec<u32>,
}

/// Generates after `prompt` (batch 1). `on_token(generated)` sees the ids so far after each new
/// token and returns `true` to stop (a stop text, a closed stream); the result is the generated
/// ids without a stop id.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    options: &GenerateOptions,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(&[u32]) -> bool,
) -> Result<Vec<u32>> {
    let mut outputs = generate_batch(
        model,
        &[prompt.to_vec()],
        options,
        sampler,
        |_, generated| on_token(generated),
    )?;
    Ok(outputs.remove(0))
}

/// Generates after each prompt, the batch left-padded (the padding is masked out and positions
/// count real tokens, so each row generates what it would alone, up to float rounding).
/// `on_token(row, generated)` is called after each row's new token and returns `true` to stop
/// that row. Rows that stopped keep feeding masked padding until all have.
pub fn generate_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if prompts.iter().any(Vec::is_empty) {
        return Err(Error::Invalid("generation needs a non-empty prompt".into()));
    }
    // Padding id: any id in the vocabulary does, it is masked out.
    let pad = 0u32;
    let mut ids = Vec::with_capacity(b * longest);
    let mut mask = Vec::with_capacity(b * longest);
    for prompt in prompts {
        let padding = longest - prompt.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(prompt.iter().copied()));
        mask.extend(std::iter::repeat_n(0u8, padding).chain(std::iter::repeat_n(1, prompt.len())));
    }
    let tensor = |values: Vec<u32>, t: usize| {
        Tensor::from_vec(values, (b, t), &Device::Cpu).map_err(compute_error)
    };
    let mask_tensor = |values: Vec<u8>, t: usize| {
        Tensor::from_vec(values, (b, t), &Device::Cpu).map_err(compute_error)
    };
    let padded = mask.contains(&0);
    let mut cache = model.kv_cache();
    let mut logits = model.forward_cached(
        &tensor(ids, longest)?,
        padded
            .then(|| mask_tensor(mask, longest))
            .transpose()?
            .as_ref(),
        &mut cache,
    )?;
    let mut contexts: Vec<Vec<u32>> = prompts.to_vec();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut running = vec![true; b];
    for _ in 0..options.max_new_tokens {
        let t = logits.dim(1).map_err(compute_error)?;
        let mut next = vec![pad; b];
        for row in 0..b {
            if !running[row] {
                continue;
            }
            let last: Vec<f32> = logits
                .i((row, t - 1))
                .and_then(|l| l.to_vec1())
                .map_err(compute_error)?;
            let token = sampler.next_token(&last, &contexts[row]);
            if options.stop_ids.contains(&token) {
                running[row] = false;
                continue;
            }
            contexts[row].push(token);
            generated[row].push(token);
            next[row] = token;
            if on_token(row, &generated[row]) {
                running[row] = false;
            }
        }
        if !running.iter().any(|&r| r) {
            break;
        }
        let step_mask: Vec<u8> = running.iter().map(|&r| u8::from(r)).collect();
        let all_running = step_mask.iter().all(|&m| m == 1);
        logits = model.forward_cached(
            &tensor(next, 1)?,
            (!all_running)
                .then(|| mask_tensor(step_mask, 1))
                .transpose()?
                .as_ref(),
            &mut cache,
        )?;
    }
    Ok(generated)
}
