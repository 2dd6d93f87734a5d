//! Generation on the GPU: the prompts once through the batched forward pass into the KV cache,
//! then one token per row per step, the 4-bit projections through the fused GEMV (see
//! [`CudaModel::forward_cached`]). Greedy decoding chooses on the device (repetition penalty,
//! argmax), so a step reads back one id per row; sampling (temperature, top-k, top-p) reads the
//! logits back and draws with the same [`Sampler`] as the CPU path, so a seed means the same
//! thing on both.

use qlora_core::Result;

use super::attention::LayerCache;
use super::model::CudaModel;
use crate::cpu::kv_cache::TokenBook;
use crate::generate::{Generator, Sampler, Session};

/// The KV cache of one generation batch: per layer, keys and values `[B, kv_heads, capacity,
/// hd]`; which cached tokens are real, as the CPU cache keeps it.
pub struct GpuKvCache {
    pub(super) layers: Vec<LayerCache>,
    pub(super) capacity: usize,
    pub(super) book: TokenBook,
}

impl Generator for CudaModel {
    fn session(&self, batch: usize, capacity: usize) -> Result<Box<dyn Session + '_>> {
        Ok(Box::new(CudaSession {
            model: self,
            cache: self.kv_cache(batch, capacity)?,
        }))
    }
}

struct CudaSession<'a> {
    model: &'a CudaModel,
    cache: GpuKvCache,
}

impl Session for CudaSession<'_> {
    fn step(
        &mut self,
        ids: &[u32],
        mask: &[f32],
        sampler: &mut Sampler,
        contexts: &[Vec<u32>],
        running: &[bool],
    ) -> Result<Vec<u32>> {
        let logits = self.model.forward_cached(ids, mask, &mut self.cache)?;
        let b = running.len();
        let vocab = self.model.vocab_size();
        let gpu = self.model.gpu();
        let params = *sampler.params();
        if params.do_sample {
            let mut next = vec![0u32; b];
            for row in 0..b {
                if running[row] {
                    let row_logits = gpu.read::<f32>(logits.at(4 * row * vocab), vocab)?;
                    next[row] = sampler.next_token(&row_logits, &contexts[row]);
                }
            }
            return Ok(next);
        }
        let kernels = self.model.kernels();
        if params.repetition_penalty != 1.0 {
            // Each row's distinct context tokens, as transformers penalizes each once.
            let distinct: Vec<Vec<u32>> = contexts
                .iter()
                .map(|c| {
                    let mut d = c.clone();
                    d.sort_unstable();
                    d.dedup();
                    d.retain(|&id| (id as usize) < vocab);
                    d
                })
                .collect();
            let width = distinct.iter().map(Vec::len).max().unwrap_or(0).max(1);
            let mut tokens = vec![0u32; b * width];
            for (row, d) in distinct.iter().enumerate() {
                tokens[row * width..row * width + d.len()].copy_from_slice(d);
            }
            let counts: Vec<i32> = distinct.iter().map(|d| d.len() as i32).collect();
            let tokens = gpu.upload(&tokens, "penalized tokens")?;
            let counts = gpu.upload(&counts, "penalized tokens")?;
            kernels.repetition_penalty(
                logits.ptr(),
                tokens.ptr(),
                counts.ptr(),
                b,
                width,
                vocab,
                params.repetition_penalty,
            )?;
        }
        let chosen = gpu.alloc(4 * b, "next tokens")?;
        kernels.argmax_rows(logits.ptr(), chosen.ptr(), b, vocab)?;
        gpu.read::<u32>(chosen.ptr(), b)
    }
}
