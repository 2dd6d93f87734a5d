//! BLOOM on the CPU, as transformers' `BloomForCausalLM` (eager attention with ALiBi).
//!
//! Shapes: `B` batch, `T` sequence, `H` hidden, `nh` heads of `hd = H / nh`, `V` vocabulary.

use super::kv_cache::{key_positions, LayerCache, Step};
use super::lora::{AdapterFactory, Linear, LoraAdapter};
use super::ops::{frozen_matmul, softmax_last_dim, Batch, Norm};
use super::weights::Weights;
use super::Mode;
use candle_core::{Device, Tensor};
use qlora_core::arch::{BloomConfig, BloomLayer, LmHead};
use qlora_core::Result;

pub struct Bloom {
    config: BloomConfig,
    /// `[V, H]`
    word_embeddings: Tensor,
    word_embeddings_layernorm: Norm,
    blocks: Vec<Block>,
    ln_f: Norm,
    /// `[V, H]`: the word embeddings when tied.
    lm_head: Tensor,
    /// `[1, nh, 1, 1]`
    alibi_slopes: Tensor,
}

struct Block {
    input_layernorm: Norm,
    query_key_value: Linear,
    dense: Linear,
    post_attention_layernorm: Norm,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

impl Bloom {
    pub(crate) fn load(
        config: &BloomConfig,
        weights: &Weights<'_>,
        mut adapters: Option<&mut AdapterFactory<'_>>,
    ) -> Result<Bloom> {
        let d = config.describe();
        let mut linear = |spec| Linear::load(spec, weights, adapters.as_deref_mut());
        let mut blocks = Vec::with_capacity(d.layers.len());
        for layer in &d.layers {
            let BloomLayer {
                input_layernorm,
                query_key_value,
                dense,
                post_attention_layernorm,
                dense_h_to_4h,
                dense_4h_to_h,
            } = layer;
            blocks.push(Block {
                input_layernorm: weights.norm(input_layernorm)?,
                query_key_value: linear(query_key_value)?,
                dense: linear(dense)?,
                post_attention_layernorm: weights.norm(post_attention_layernorm)?,
                dense_h_to_4h: linear(dense_h_to_4h)?,
                dense_4h_to_h: linear(dense_4h_to_h)?,
            });
        }
        let word_embeddings = weights.embedding(&d.word_embeddings)?;
        let lm_head = match &d.lm_head {
            LmHead::TiedToEmbedding => word_embeddings.clone(),
            LmHead::Separate(spec) => weights.embedding(spec)?,
        };
        let alibi_slopes = Tensor::from_vec(
            config.alibi_slopes(),
            (1, config.n_head, 1, 1),
            &Device::Cpu,
        )
        .map_err(super::compute_error)?;
        Ok(Bloom {
            config: config.clone(),
            word_embeddings,
            word_embeddings_layernorm: weights.norm(&d.word_embeddings_layernorm)?,
            blocks,
            ln_f: weights.norm(&d.ln_f)?,
            lm_head,
            alibi_slopes,
        })
    }

    pub fn config(&self) -> &BloomConfig {
        &self.config
    }

    pub(crate) fn lora_adapters(&self) -> Vec<&LoraAdapter> {
        self.blocks
            .iter()
            .flat_map(|b| {
                [
                    &b.query_key_value,
                    &b.dense,
                    &b.dense_h_to_4h,
                    &b.dense_4h_to_h,
                ]
            })
            .filter_map(Linear::lora)
            .collect()
    }

    /// Logits `[B, T, V]`.
    pub(crate) fn forward(
        &self,
        batch: &Batch,
        mode: &mut Mode<'_>,
    ) -> candle_core::Result<Tensor> {
        let alibi = self.alibi(&batch.key_mask, batch.batch_size)?; // [B, nh, 1, T]
        let mask = batch.causal_mask()?; // [B, 1, T, T]
        self.layers_and_head(batch, &alibi, &mask, None, mode)
    }

    /// Logits `[B, T, V]` of the new tokens of `batch`, attending to the cached ones too.
    pub(crate) fn forward_cached(
        &self,
        batch: &Batch,
        step: &Step,
        layers: &mut [LayerCache],
    ) -> candle_core::Result<Tensor> {
        let alibi = self.alibi(&step.key_mask, batch.batch_size)?; // [B, nh, 1, S]
        self.layers_and_head(
            batch,
            &alibi,
            &step.causal_mask,
            Some(layers),
            &mut Mode::Inference,
        )
    }

    /// The blocks and the head: `alibi` `[B, nh, 1, S]`, `mask` `[B, 1, T, S]`, where `S = T`
    /// without a cache.
    fn layers_and_head(
        &self,
        batch: &Batch,
        alibi: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut [LayerCache]>,
        mode: &mut Mode<'_>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = (batch.batch_size, batch.seq_len);
        let embedded = batch.embed(&self.word_embeddings)?; // [B, T, H]
        let mut hidden = self.word_embeddings_layernorm.forward(&embedded)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|layers| &mut layers[i]);
            hidden = block.forward(&hidden, alibi, mask, layer_cache, &self.config, mode)?;
        }
        let hidden = self.ln_f.forward(&hidden)?; // [B, T, H]
        let logits = frozen_matmul(
            &hidden.reshape((b * t, self.config.hidden_size))?,
            &self.lm_head,
        )?;
        logits.reshape((b, t, self.config.vocab_size))
    }

    /// The ALiBi bias `[B, nh, 1, S]` for the keys of `key_mask` `[B * S]`: `slope[h] *
    /// position[b, j]` for key `j`, where a key's position counts the real tokens before it and
    /// padding keys get 0 (transformers' `(attention_mask.cumsum(-1) - 1) * attention_mask`).
    fn alibi(&self, key_mask: &[f32], b: usize) -> candle_core::Result<Tensor> {
        let s = key_mask.len() / b;
        let positions = Tensor::from_vec(key_positions(key_mask, b), (b, 1, 1, s), &Device::Cpu)?;
        positions.broadcast_mul(&self.alibi_slopes)
    }

    pub(crate) fn num_layers(&self) -> usize {
        self.blocks.len()
    }
}

impl Block {
    /// `hidden` `[B, T, H]` -> `[B, T, H]`.
    fn forward(
        &self,
        hidden: &Tensor,
        alibi: &Tensor,
        mask: &Tensor,
        cache: Option<&mut LayerCache>,
        config: &BloomConfig,
        mode: &mut Mode<'_>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let (nh, hd) = (config.n_head, config.head_dim());
        let post_ln = config.apply_residual_connection_post_layernorm;

        let normed = self.input_layernorm.forward(hidden)?;
        let residual = if post_ln { &normed } else { hidden };
        // Fused projection, viewed as [B, T, nh, 3, hd]: q, k, v side by side within each head.
        let fused = self
            .query_key_value
            .forward(&normed, mode)?
            .reshape((b, t, nh, 3, hd))?;
        let head = |i: usize| -> candle_core::Result<Tensor> {
            // [B, T, nh, hd] -> [B, nh, T, hd]
            fused
                .narrow(3, i, 1)?
                .squeeze(3)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (head(0)?, head(1)?, head(2)?);
        // With a cache, the keys and values of every token so far: [B, nh, S, hd].
        let (k, v) = match cache {
            Some(cache) => cache.extend(k, v)?,
            None => (k, v),
        };

        // scores = alibi + (q k^T) / sqrt(hd) + mask: [B, nh, T, S]
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?
            .broadcast_add(alibi)?
            .broadcast_add(mask)?;
        let probs = softmax_last_dim(&scores)?;
        let probs = mode.dropout(&probs, config.attention_dropout)?;
        let context = probs
            .matmul(&v)? // [B, nh, T, hd]
            .transpose(1, 2)?
            .reshape((b, t, h))?; // heads merged: [B, T, nh * hd]
        let attention = self.dense.forward(&context, mode)?;
        let attention = (mode.dropout(&attention, config.hidden_dropout)? + residual)?;

        let normed = self.post_attention_layernorm.forward(&attention)?;
        let residual = if post_ln { &normed } else { &attention };
        let up = bloom_gelu(&self.dense_h_to_4h.forward(&normed, mode)?)?; // [B, T, 4H]
        let down = self.dense_4h_to_h.forward(&up, mode)?;
        mode.dropout(&down, config.hidden_dropout)? + residual
    }
}

/// BLOOM's tanh GELU, operation for operation as `bloom_gelu_forward`:
/// `x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))`.
fn bloom_gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    let cubic = (x.affine(0.044715, 0.0)? * x)?.affine(1.0, 1.0)?; // 1 + 0.044715 x^2
    let inner = (x.affine(0.79788456, 0.0)? * cubic)?;
    x.affine(0.5, 0.0)? * inner.tanh()?.affine(1.0, 1.0)?
}
