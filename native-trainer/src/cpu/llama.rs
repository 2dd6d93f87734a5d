//! The LLaMA family (`llama`, `qwen2`) on the CPU, as transformers' `LlamaForCausalLM` /
//! `Qwen2ForCausalLM`: RMSNorm, RoPE, grouped-query attention, SwiGLU.
//!
//! Shapes: `B` batch, `T` sequence, `H` hidden, `nq` query heads and `nkv` key/value heads of
//! `d` channels, `g = nq / nkv` query heads per key/value head, `V` vocabulary.

use super::kv_cache::{LayerCache, Step};
use super::lora::{AdapterFactory, Linear, LoraAdapter};
use super::ops::{frozen_matmul, softmax_last_dim, Batch, Norm};
use super::weights::Weights;
use super::Mode;
use candle_core::{Device, Tensor, D};
use qlora_core::arch::{LlamaConfig, LlamaLayer, LmHead, RopeLayout};
use qlora_core::Result;

pub struct Llama {
    config: LlamaConfig,
    /// `[V, H]`
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: Norm,
    /// `[V, H]`: the token embeddings when tied.
    lm_head: Tensor,
}

struct Block {
    input_layernorm: Norm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: Norm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Llama {
    pub(crate) fn load(
        config: &LlamaConfig,
        weights: &Weights<'_>,
        mut adapters: Option<&mut AdapterFactory<'_>>,
    ) -> Result<Llama> {
        let d = config.describe();
        let mut linear = |spec| Linear::load(spec, weights, adapters.as_deref_mut());
        let mut blocks = Vec::with_capacity(d.layers.len());
        for layer in &d.layers {
            let LlamaLayer {
                input_layernorm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                post_attention_layernorm,
                gate_proj,
                up_proj,
                down_proj,
            } = layer;
            blocks.push(Block {
                input_layernorm: weights.norm(input_layernorm)?,
                q_proj: linear(q_proj)?,
                k_proj: linear(k_proj)?,
                v_proj: linear(v_proj)?,
                o_proj: linear(o_proj)?,
                post_attention_layernorm: weights.norm(post_attention_layernorm)?,
                gate_proj: linear(gate_proj)?,
                up_proj: linear(up_proj)?,
                down_proj: linear(down_proj)?,
            });
        }
        let embed_tokens = weights.embedding(&d.embed_tokens)?;
        let lm_head = match &d.lm_head {
            LmHead::TiedToEmbedding => embed_tokens.clone(),
            LmHead::Separate(spec) => weights.embedding(spec)?,
        };
        Ok(Llama {
            config: config.clone(),
            embed_tokens,
            blocks,
            norm: weights.norm(&d.norm)?,
            lm_head,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub(crate) fn lora_adapters(&self) -> Vec<&LoraAdapter> {
        self.blocks
            .iter()
            .flat_map(|b| {
                [
                    &b.q_proj,
                    &b.k_proj,
                    &b.v_proj,
                    &b.o_proj,
                    &b.gate_proj,
                    &b.up_proj,
                    &b.down_proj,
                ]
            })
            .filter_map(Linear::lora)
            .collect()
    }

    /// Logits `[B, T, V]`. Positions are `0..T` in every row (transformers' default
    /// `position_ids`), so padding belongs on the right.
    pub(crate) fn forward(
        &self,
        batch: &Batch,
        mode: &mut Mode<'_>,
    ) -> candle_core::Result<Tensor> {
        let rope = Rope::new(&self.config, batch.seq_len)?;
        let mask = batch.causal_mask()?; // [B, 1, T, T]
        self.layers_and_head(batch, &rope, &mask, None, mode)
    }

    /// Logits `[B, T, V]` of the new tokens of `batch`, attending to the cached ones too, at the
    /// positions of `step` (padding-aware).
    pub(crate) fn forward_cached(
        &self,
        batch: &Batch,
        step: &Step,
        layers: &mut [LayerCache],
    ) -> candle_core::Result<Tensor> {
        let rope = Rope::at_positions(&self.config, &step.positions, batch.batch_size)?;
        self.layers_and_head(
            batch,
            &rope,
            &step.causal_mask,
            Some(layers),
            &mut Mode::Inference,
        )
    }

    /// The blocks and the head; `mask` `[B, 1, T, S]`, where `S = T` without a cache.
    fn layers_and_head(
        &self,
        batch: &Batch,
        rope: &Rope,
        mask: &Tensor,
        mut cache: Option<&mut [LayerCache]>,
        mode: &mut Mode<'_>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = (batch.batch_size, batch.seq_len);
        let mut hidden = batch.embed(&self.embed_tokens)?; // [B, T, H]
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|layers| &mut layers[i]);
            hidden = block.forward(&hidden, rope, mask, layer_cache, &self.config, mode)?;
        }
        let hidden = self.norm.forward(&hidden)?;
        let logits = frozen_matmul(
            &hidden.reshape((b * t, self.config.hidden_size))?,
            &self.lm_head,
        )?;
        logits.reshape((b, t, self.config.vocab_size))
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
        rope: &Rope,
        mask: &Tensor,
        cache: Option<&mut LayerCache>,
        config: &LlamaConfig,
        mode: &mut Mode<'_>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = hidden.dims3()?;
        let (nq, nkv, d) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        let g = config.kv_group_size();

        let normed = self.input_layernorm.forward(hidden)?;
        // [B, T, n * d] -> [B, n, T, d]
        let heads = |x: Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        let q = rope.apply(&heads(self.q_proj.forward(&normed, mode)?, nq)?)?;
        let k = rope.apply(&heads(self.k_proj.forward(&normed, mode)?, nkv)?)?;
        let v = heads(self.v_proj.forward(&normed, mode)?, nkv)?;
        // With a cache, the keys and values of every token so far: [B, nkv, S, d].
        let (k, v) = match cache {
            Some(cache) => cache.extend(k, v)?,
            None => (k, v),
        };
        let s = k.dim(2)?;

        // Grouped-query attention without copying k and v: query head h uses key/value head
        // h / g, so the g query heads of one group are stacked along the rows:
        // q [B, nq, T, d] = [B, nkv, g * T, d].
        let q = q.reshape((b, nkv, g * t, d))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))? // [B, nkv, g * T, S]
            .reshape((b, nq, t, s))?
            .broadcast_add(mask)?;
        let probs = softmax_last_dim(&scores)?;
        let probs = mode.dropout(&probs, config.attention_dropout)?;
        let context = probs
            .reshape((b, nkv, g * t, s))?
            .matmul(&v)? // [B, nkv, g * T, d]
            .reshape((b, nq, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, nq * d))?;
        let hidden = (hidden + self.o_proj.forward(&context, mode)?)?;

        let normed = self.post_attention_layernorm.forward(&hidden)?;
        let gate = self.gate_proj.forward(&normed, mode)?.silu()?; // [B, T, I]
        let up = self.up_proj.forward(&normed, mode)?;
        hidden + self.down_proj.forward(&(gate * up)?, mode)?
    }
}

/// Rotary position embedding: `x * cos + rotate(x) * sin`, where `rotate` maps each rotated
/// pair `(x1, x2)` to `(-x2, x1)`.
struct Rope {
    layout: RopeLayout,
    /// `[T, d]` (positions `0..T`) or `[B, 1, T, d]` (per-row positions): `cos(p * inv_freq[j])`
    /// at both channels of pair `j`.
    cos: Tensor,
    /// Same shape as `cos`.
    sin: Tensor,
}

impl Rope {
    /// Positions `0..T` in every row.
    fn new(config: &LlamaConfig, seq_len: usize) -> candle_core::Result<Rope> {
        let positions: Vec<u32> = (0..seq_len as u32).collect();
        Rope::tables(config, &positions, &[seq_len, config.head_dim])
    }

    /// Row `b`'s token `t` at `positions[b * T + t]`.
    fn at_positions(
        config: &LlamaConfig,
        positions: &[u32],
        batch_size: usize,
    ) -> candle_core::Result<Rope> {
        let t = positions.len() / batch_size;
        Rope::tables(config, positions, &[batch_size, 1, t, config.head_dim])
    }

    fn tables(
        config: &LlamaConfig,
        positions: &[u32],
        shape: &[usize],
    ) -> candle_core::Result<Rope> {
        let inv_freq = config.rope_inv_freq(); // [d / 2]
        let d = config.head_dim;
        let mut cos = Vec::with_capacity(positions.len() * d);
        let mut sin = Vec::with_capacity(positions.len() * d);
        for &position in positions {
            // The angle is an f32 product, as transformers' `inv_freq @ position_ids`.
            let angle = |j: usize| position as f32 * inv_freq[j];
            let channel_pair = |c: usize| match config.rope_layout {
                RopeLayout::HalfSplit => c % (d / 2),
                RopeLayout::AdjacentPairs => c / 2,
            };
            for c in 0..d {
                let a = f64::from(angle(channel_pair(c)));
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Rope {
            layout: config.rope_layout,
            cos: Tensor::from_vec(cos, shape, &Device::Cpu)?,
            sin: Tensor::from_vec(sin, shape, &Device::Cpu)?,
        })
    }

    /// `x` `[B, n, T, d]` -> `[B, n, T, d]`.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let rotated = match self.layout {
            // transformers' rotate_half: cat(-x[d/2..], x[..d/2])
            RopeLayout::HalfSplit => {
                let first = x.narrow(D::Minus1, 0, d / 2)?;
                let second = x.narrow(D::Minus1, d / 2, d / 2)?;
                Tensor::cat(&[&second.neg()?, &first], D::Minus1)?
            }
            // llama.cpp's NORM rope: (x[2j], x[2j+1]) -> (-x[2j+1], x[2j])
            RopeLayout::AdjacentPairs => {
                let mut pairs_dims = x.dims().to_vec();
                pairs_dims.pop();
                pairs_dims.extend([d / 2, 2]);
                let pairs = x.reshape(pairs_dims)?; // [.., d/2, 2]
                let even = pairs.narrow(D::Minus1, 0, 1)?;
                let odd = pairs.narrow(D::Minus1, 1, 1)?;
                Tensor::cat(&[&odd.neg()?, &even], D::Minus1)?.reshape(x.dims())?
            }
        };
        x.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?
    }
}
