//! Generation on the GPU: the prompts once through the batched forward pass into the KV cache,
//! then one token per row per step, the 4-bit projections through the fused GEMV (see
//! [`CudaModel::forward_cached`]). Greedy decoding chooses on the device (repetition penalty,
//! argmax), so a step reads back one id per row; sampling (temperature, top-k, top-p) reads the
//! logits back and draws with the same [`Sampler`] as the CPU path, so a seed means the same
//! thing on both.

use qlora_core::Result;
use qlora_kernels::{DeviceBuffer, Gpu, Kernels, Recorded};

use super::attention::{KeyMask, LayerCache, Rope};
use super::model::CudaModel;
use crate::cpu::kv_cache::TokenBook;
use crate::generate::{Generator, Sampler, Session};

/// The KV cache of one generation batch: per layer, keys and values `[B, kv_heads, capacity,
/// hd]`; which cached tokens are real, as the CPU cache keeps it; the inputs and logits of a
/// decoding step at fixed addresses, and the step recorded as a CUDA graph once it has run.
pub struct GpuKvCache {
    pub(super) layers: Vec<LayerCache>,
    pub(super) capacity: usize,
    pub(super) book: TokenBook,
    pub(super) inputs: DecodeInputs,
    /// `[B, vocab]` f32: the last step's logits.
    pub(super) logits: DeviceBuffer,
    pub(super) recorded_step: Option<Recorded>,
    /// Decoding steps are recorded (until recording fails once).
    pub(super) record: bool,
}

/// The inputs of a decoding step (one new token per row) at fixed device addresses, 32-bit
/// words in one buffer written with one copy per step: the number of cached tokens (i32), the
/// ids `[B]` (u32), the key mask and ALiBi key positions `[B, capacity]` (f32, each row's
/// first `past + 1` used), and the RoPE tables `[B, hd]` (f32 cos, then sin). A recorded step
/// reads them there.
pub(super) struct DecodeInputs {
    buffer: DeviceBuffer,
    batch: usize,
    capacity: usize,
    rope_dim: usize,
}

impl DecodeInputs {
    pub(super) fn new(
        gpu: &Gpu,
        batch: usize,
        capacity: usize,
        rope_dim: usize,
    ) -> Result<DecodeInputs> {
        // The past length, then per row: an id, mask and positions, cos and sin.
        let words = 1 + batch * (1 + 2 * capacity + 2 * rope_dim);
        Ok(DecodeInputs {
            buffer: gpu.zeros(4 * words, "decoding step inputs")?,
            batch,
            capacity,
            rope_dim,
        })
    }

    // Word offsets of the parts.
    fn ids_at(&self) -> usize {
        1
    }
    fn mask_at(&self) -> usize {
        self.ids_at() + self.batch
    }
    fn positions_at(&self) -> usize {
        self.mask_at() + self.batch * self.capacity
    }
    fn cos_at(&self) -> usize {
        self.positions_at() + self.batch * self.capacity
    }
    fn sin_at(&self) -> usize {
        self.cos_at() + self.batch * self.rope_dim
    }

    fn word(&self, at: usize) -> u64 {
        self.buffer.at(4 * at)
    }

    /// Where the kernels read the number of tokens cached before the step (one i32).
    pub(super) fn past_len(&self) -> u64 {
        self.word(0)
    }
    pub(super) fn ids(&self) -> u64 {
        self.word(self.ids_at())
    }
    pub(super) fn keys(&self) -> KeyMask {
        KeyMask {
            mask: self.word(self.mask_at()),
            positions: self.word(self.positions_at()),
            stride: self.capacity,
        }
    }
    /// The RoPE tables, for a RoPE model (`half_split`: its pair layout).
    pub(super) fn rope(&self, half_split: Option<bool>) -> Option<Rope> {
        half_split.map(|half_split| Rope {
            cos: self.word(self.cos_at()),
            sin: self.word(self.sin_at()),
            half_split,
        })
    }

    /// Sets the number of tokens cached before the next step (for steps not recorded, which
    /// take everything else as arguments).
    pub(super) fn write_past(&self, gpu: &Gpu, past: usize) -> Result<()> {
        gpu.write(self.past_len(), &[past as i32])
    }

    /// Writes a decoding step's inputs: `past` tokens cached before it, one id per row,
    /// `key_mask [B, past + 1]` and (ALiBi) the keys' positions in the same layout, (RoPE) the
    /// new tokens' tables `[B, hd]`.
    pub(super) fn write(
        &self,
        gpu: &Gpu,
        past: usize,
        ids: &[u32],
        key_mask: &[f32],
        positions: Option<&[f32]>,
        rope: Option<(Vec<f32>, Vec<f32>, bool)>,
    ) -> Result<()> {
        let keys = past + 1;
        let mut words = vec![0u32; self.buffer.bytes() / 4];
        words[0] = past as u32;
        words[self.ids_at()..self.mask_at()].copy_from_slice(ids);
        let rows = |at: usize, values: &[f32], words: &mut [u32]| {
            for (row, values) in values.chunks_exact(keys).enumerate() {
                let start = at + row * self.capacity;
                for (w, v) in words[start..start + keys].iter_mut().zip(values) {
                    *w = v.to_bits();
                }
            }
        };
        rows(self.mask_at(), key_mask, &mut words);
        if let Some(positions) = positions {
            rows(self.positions_at(), positions, &mut words);
        }
        if let Some((cos, sin, _)) = rope {
            for (at, table) in [(self.cos_at(), cos), (self.sin_at(), sin)] {
                for (w, v) in words[at..at + table.len()].iter_mut().zip(&table) {
                    *w = v.to_bits();
                }
            }
        }
        gpu.write(self.buffer.ptr(), &words)
    }
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

/// Room for top-k candidates per row beyond k itself (scores tied with the k-th largest).
const TIED_ROOM: usize = 1024;

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
        let top_k_on_device = params.do_sample && (1..vocab).contains(&params.top_k);
        if params.do_sample && !top_k_on_device {
            // Every token stays a candidate: the rows come back whole.
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
        if top_k_on_device {
            return sample_top_k(self.model, logits, sampler, running);
        }
        let chosen = gpu.alloc(4 * b, "next tokens")?;
        let partial = gpu.alloc(Kernels::argmax_partial_bytes(b, vocab), "greedy choice")?;
        kernels.argmax_rows(logits.ptr(), chosen.ptr(), b, vocab, partial.ptr())?;
        gpu.read::<u32>(chosen.ptr(), b)
    }
}

/// Sampling with top-k: the device scales the (penalized) `logits` and keeps each row's top-k
/// scores; only those come back, and the sampler draws among them exactly as it would from the
/// whole row (top-p, then its seeded RNG).
fn sample_top_k(
    model: &CudaModel,
    logits: &DeviceBuffer,
    sampler: &mut Sampler,
    running: &[bool],
) -> Result<Vec<u32>> {
    let (b, vocab) = (running.len(), model.vocab_size());
    let gpu = model.gpu();
    let k = sampler.params().top_k;
    let room = k + TIED_ROOM;
    // [indices B * room][values B * room][counts B], read back in one copy.
    let found = gpu.alloc(4 * (2 * b * room + b), "top-k candidates")?;
    model.kernels().top_k_candidates(
        logits.ptr(),
        b,
        vocab,
        sampler.inverse_temperature(),
        k,
        [found.ptr(), found.at(4 * b * room)],
        room,
        found.at(8 * b * room),
    )?;
    let words = gpu.read::<u32>(found.ptr(), 2 * b * room + b)?;
    let (indices, rest) = words.split_at(b * room);
    let (values, counts) = rest.split_at(b * room);
    let mut next = vec![0u32; b];
    for row in 0..b {
        if !running[row] {
            continue;
        }
        let count = counts[row] as usize;
        if count > room {
            // More scores tie with the k-th largest than the device kept: the whole
            // (penalized) row comes back.
            let scores = gpu.read::<f32>(logits.at(4 * row * vocab), vocab)?;
            next[row] = sampler.next_token_penalized(scores);
            continue;
        }
        let at = row * room;
        let mut candidates: Vec<(u32, f32)> = (at..at + count)
            .map(|i| (indices[i], f32::from_bits(values[i])))
            .collect();
        next[row] = sampler.next_token_from_candidates(&mut candidates);
    }
    Ok(next)
}
