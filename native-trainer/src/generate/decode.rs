//! The decoding loop: the prompts once through the model, then one token per row per step
//! through the KV cache. The loop is the same for every compute path; a [`Generator`] (the CPU
//! model, the CUDA engine) supplies the steps.

use super::sampling::Sampler;
use crate::cpu::{compute_error, KvCache, Model};
use candle_core::{Device, IndexOp, Tensor};
use qlora_core::{Error, Result};

/// When generation stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Tokens that end a row (EOS, an end-of-turn token); they are not part of the output.
    pub stop_ids: Vec<u32>,
}

/// A model that generates: it opens decoding sessions over its own KV cache.
pub trait Generator {
    /// A session for `batch` sequences of at most `capacity` tokens each (prompt included).
    fn session(&self, batch: usize, capacity: usize) -> Result<Box<dyn Session + '_>>;
}

/// One batch's decoding state (its KV cache).
pub trait Session {
    /// Feeds `ids [B, T]` (`mask [B, T]`: 1 real, 0 padding) after the tokens seen so far and
    /// returns the next token of each row where `running` is set, chosen by `sampler` after that
    /// row's `contexts` (prompt and generated ids; the repetition penalty looks at them); other
    /// rows get an unspecified id.
    fn step(
        &mut self,
        ids: &[u32],
        mask: &[f32],
        sampler: &mut Sampler,
        contexts: &[Vec<u32>],
        running: &[bool],
    ) -> Result<Vec<u32>>;
}

/// Generates after `prompt` (batch 1). `on_token(generated)` sees the ids so far after each new
/// token and returns `true` to stop (a stop text, a closed stream); the result is the generated
/// ids without a stop id.
pub fn generate(
    model: &dyn Generator,
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
    model: &dyn Generator,
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
        mask.extend(
            std::iter::repeat_n(0f32, padding).chain(std::iter::repeat_n(1.0, prompt.len())),
        );
    }
    let mut session = model.session(b, longest + options.max_new_tokens)?;
    let mut contexts: Vec<Vec<u32>> = prompts.to_vec();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut running = vec![true; b];
    if options.max_new_tokens == 0 {
        return Ok(generated);
    }
    let mut next = session.step(&ids, &mask, sampler, &contexts, &running)?;
    for step in 0..options.max_new_tokens {
        let mut fed = vec![pad; b];
        for row in 0..b {
            if !running[row] {
                continue;
            }
            let token = next[row];
            if options.stop_ids.contains(&token) {
                running[row] = false;
                continue;
            }
            contexts[row].push(token);
            generated[row].push(token);
            fed[row] = token;
            if on_token(row, &generated[row]) {
                running[row] = false;
            }
        }
        if !running.iter().any(|&r| r) || step + 1 == options.max_new_tokens {
            break;
        }
        let step_mask: Vec<f32> = running.iter().map(|&r| f32::from(u8::from(r))).collect();
        next = session.step(&fed, &step_mask, sampler, &contexts, &running)?;
    }
    Ok(generated)
}

impl Generator for Model {
    fn session(&self, _batch: usize, _capacity: usize) -> Result<Box<dyn Session + '_>> {
        Ok(Box::new(CpuSession {
            model: self,
            cache: self.kv_cache(),
        }))
    }
}

/// The CPU path's session: its KV cache grows as needed.
struct CpuSession<'a> {
    model: &'a Model,
    cache: KvCache,
}

impl Session for CpuSession<'_> {
    fn step(
        &mut self,
        ids: &[u32],
        mask: &[f32],
        sampler: &mut Sampler,
        contexts: &[Vec<u32>],
        running: &[bool],
    ) -> Result<Vec<u32>> {
        let b = running.len();
        let t = ids.len() / b;
        let input = Tensor::from_vec(ids.to_vec(), (b, t), &Device::Cpu).map_err(compute_error)?;
        // An unpadded step goes without a mask, as the full forward pass is called.
        let mask = if mask.iter().all(|&m| m == 1.0) {
            None
        } else {
            let bytes: Vec<u8> = mask.iter().map(|&m| u8::from(m != 0.0)).collect();
            Some(Tensor::from_vec(bytes, (b, t), &Device::Cpu).map_err(compute_error)?)
        };
        let logits = self
            .model
            .forward_cached(&input, mask.as_ref(), &mut self.cache)?;
        let mut next = vec![0u32; b];
        for row in 0..b {
            if !running[row] {
                continue;
            }
            let last: Vec<f32> = logits
                .i((row, t - 1))
                .and_then(|l| l.to_vec1())
                .map_err(compute_error)?;
            next[row] = sampler.next_token(&last, &contexts[row]);
        }
        Ok(next)
    }
}
