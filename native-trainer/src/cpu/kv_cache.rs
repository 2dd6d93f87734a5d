//! The key/value cache of incremental decoding: each layer's keys and values of every token seen
//! so far, and which of those tokens are real (left- or right-padded prompts of a batch).
//!
//! A step feeds `T` new tokens per row (the whole prompt first, then one token at a time); the
//! attention of the new queries covers the `S = past + T` cached keys. Positions (RoPE, ALiBi)
//! count the real tokens before each token, as transformers' `generate` derives `position_ids`
//! from the attention mask, so every row of a padded batch computes what it would alone.

use super::ops::Batch;
use candle_core::{Device, Tensor};
use qlora_core::{Error, Result};

/// The cache of one sequence batch; make it with [`Model::kv_cache`](super::Model::kv_cache) and
/// feed it to [`Model::forward_cached`](super::Model::forward_cached). After an error it must be
/// discarded (a layer may have been extended and the others not).
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Set by the first step, which fixes the batch size.
    book: Option<TokenBook>,
}

/// One layer's keys and values, `[B, heads, S, head_dim]` each.
#[derive(Default)]
pub(crate) struct LayerCache(Option<(Tensor, Tensor)>);

impl LayerCache {
    /// Appends this step's keys and values `[B, heads, T, d]` and returns all of them
    /// `[B, heads, S, d]`.
    ///
    /// The cache keeps them detached from the autograd graph: keys and values that depend on
    /// LoRA `Var`s would otherwise hold every earlier step's activations alive, and a long
    /// generation with an adapter would grow without bound (nothing is back-propagated through
    /// a cached forward).
    pub(crate) fn extend(&mut self, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = (k.detach(), v.detach());
        let all = match self.0.take() {
            None => (k, v),
            Some((past_k, past_v)) => (
                Tensor::cat(&[&past_k, &k], 2)?,
                Tensor::cat(&[&past_v, &v], 2)?,
            ),
        };
        self.0 = Some(all.clone());
        Ok(all)
    }
}

/// Which cached tokens of each row are real, and how many real tokens each row has seen: the
/// bookkeeping of a KV cache, shared by the CPU cache and the CUDA one.
pub struct TokenBook {
    batch_size: usize,
    /// `[B * S]`, row-major: 1 for a real token, 0 for padding.
    key_mask: Vec<f32>,
    /// Real tokens per row so far.
    real_tokens: Vec<u32>,
}

/// The masks and positions of one step, from [`TokenBook::begin_step`].
pub struct BookStep {
    /// `[B * S]`: 1 for a real key, 0 for padding, over all cached keys.
    pub key_mask: Vec<f32>,
    /// `[B * T]`: each new token's position, the number of real tokens before it (0 for padding).
    pub positions: Vec<u32>,
}

/// Each key's position `[B * S]` for the keys of `key_mask [B * S]`: the real tokens before it,
/// 0 for padding (transformers' `(attention_mask.cumsum(-1) - 1) * attention_mask`).
pub fn key_positions(key_mask: &[f32], batch_size: usize) -> Vec<f32> {
    let s = key_mask.len() / batch_size.max(1);
    let mut positions = Vec::with_capacity(key_mask.len());
    for row in key_mask.chunks_exact(s.max(1)) {
        let mut real_tokens = 0f32;
        for &is_real in row {
            real_tokens += is_real;
            positions.push((real_tokens - 1.0) * is_real);
        }
    }
    positions
}

impl TokenBook {
    pub fn new(batch_size: usize) -> TokenBook {
        TokenBook {
            batch_size,
            key_mask: Vec::new(),
            real_tokens: vec![0; batch_size],
        }
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Cached tokens per row (padding included).
    pub fn len(&self) -> usize {
        self.key_mask.len() / self.batch_size.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.key_mask.is_empty()
    }

    /// Records `t` new tokens per row (`new_mask [B * T]`: 1 real, 0 padding) and returns the
    /// step's masks and positions.
    pub fn begin_step(&mut self, new_mask: &[f32], t: usize) -> Result<BookStep> {
        let b = self.batch_size;
        if new_mask.len() != b * t {
            return Err(Error::Invalid(format!(
                "the KV cache holds {b} sequences, the step feeds {} tokens for {t} per row",
                new_mask.len()
            )));
        }
        let past = self.len();
        let s = past + t;
        let mut key_mask = Vec::with_capacity(b * s);
        let mut positions = Vec::with_capacity(b * t);
        for row in 0..b {
            key_mask.extend_from_slice(&self.key_mask[row * past..(row + 1) * past]);
            for &is_real in &new_mask[row * t..(row + 1) * t] {
                key_mask.push(is_real);
                if is_real == 1.0 {
                    positions.push(self.real_tokens[row]);
                    self.real_tokens[row] += 1;
                } else {
                    positions.push(0);
                }
            }
        }
        self.key_mask.clone_from(&key_mask);
        Ok(BookStep {
            key_mask,
            positions,
        })
    }
}

/// What the layers of one cached step need besides the hidden states.
pub(crate) struct Step {
    /// `[B * S]`: 1 for a real key, 0 for padding, over all cached keys.
    pub key_mask: Vec<f32>,
    /// `[B * T]`: each new token's position, the number of real tokens before it (0 for padding).
    pub positions: Vec<u32>,
    /// `[B, 1, T, S]`: 0 where new query `i` (absolute index `past + i`) may see key `j`
    /// (`j <= past + i` and key `j` is real), the lowest f32 elsewhere, as the full forward's mask.
    pub causal_mask: Tensor,
}

impl KvCache {
    pub(crate) fn new(num_layers: usize) -> KvCache {
        KvCache {
            layers: (0..num_layers).map(|_| LayerCache::default()).collect(),
            book: None,
        }
    }

    /// Cached tokens per row (padding included).
    pub fn len(&self) -> usize {
        self.book.as_ref().map_or(0, TokenBook::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn layers_mut(&mut self) -> &mut [LayerCache] {
        &mut self.layers
    }

    /// Records the new tokens of `batch` and returns the masks and positions of the step.
    pub(crate) fn begin_step(&mut self, batch: &Batch) -> Result<Step> {
        let (b, t) = (batch.batch_size, batch.seq_len);
        let book = self.book.get_or_insert_with(|| TokenBook::new(b));
        if book.batch_size() != b {
            return Err(Error::Invalid(format!(
                "the KV cache holds {} sequences, the step feeds {b}",
                book.batch_size()
            )));
        }
        let past = book.len();
        let BookStep {
            key_mask,
            positions,
        } = book.begin_step(&batch.key_mask, t)?;
        let s = past + t;
        let mut mask = vec![0f32; b * t * s];
        for row in 0..b {
            let keys = &key_mask[row * s..(row + 1) * s];
            for i in 0..t {
                let query = &mut mask[(row * t + i) * s..(row * t + i + 1) * s];
                for (j, value) in query.iter_mut().enumerate() {
                    if j > past + i || keys[j] == 0.0 {
                        *value = f32::MIN;
                    }
                }
            }
        }
        let causal_mask =
            Tensor::from_vec(mask, (b, 1, t, s), &Device::Cpu).map_err(super::compute_error)?;
        Ok(Step {
            key_mask,
            positions,
            causal_mask,
        })
    }
}
