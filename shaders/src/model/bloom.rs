//! BLOOM layers as transformers' `BloomForCausalLM`: LayerNorm, the fused query/key/value
//! projection (per head: q, k, v side by side), ALiBi attention, tanh-GELU MLP.

use qlora_core::arch::BloomDescription;
use qlora_core::Result;

use super::{Dims, Loader, Step};
use crate::buffers::scratch;
use crate::kernels::{AttnParams, Recorder};
use crate::weights::{Linear, Norm};

pub(crate) struct Bloom {
    word_embeddings_layernorm: Norm,
    blocks: Vec<Block>,
    post_ln: bool,
    /// `[heads]`
    alibi_slopes: wgpu::Buffer,
    /// `[chunk, 3H]`
    qkv: wgpu::Buffer,
    /// `[chunk, 4H]`
    mlp: wgpu::Buffer,
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
    pub(crate) async fn load(
        loader: &mut Loader<'_, '_>,
        d: &BloomDescription,
        dims: Dims,
    ) -> Result<Bloom> {
        let word_embeddings_layernorm = loader.norm(&d.word_embeddings_layernorm).await?;
        let mut blocks = Vec::with_capacity(d.layers.len());
        for l in &d.layers {
            blocks.push(Block {
                input_layernorm: loader.norm(&l.input_layernorm).await?,
                query_key_value: loader.linear(&l.query_key_value).await?,
                dense: loader.linear(&l.dense).await?,
                post_attention_layernorm: loader.norm(&l.post_attention_layernorm).await?,
                dense_h_to_4h: loader.linear(&l.dense_h_to_4h).await?,
                dense_4h_to_h: loader.linear(&l.dense_4h_to_h).await?,
            });
        }
        let h = dims.hidden;
        Ok(Bloom {
            word_embeddings_layernorm,
            blocks,
            post_ln: d.config.apply_residual_connection_post_layernorm,
            alibi_slopes: loader.f32_table("ALiBi slopes", &d.config.alibi_slopes())?,
            qkv: scratch(loader.engine, "query_key_value", dims.chunk * 3 * h)?,
            mlp: scratch(loader.engine, "mlp", dims.chunk * 4 * h)?,
        })
    }

    pub(crate) fn scratch_bytes(&self) -> u64 {
        self.qkv.size() + self.mlp.size()
    }

    pub(crate) fn record(
        &self,
        rec: &mut Recorder,
        step: &Step<'_>,
        cache: &[(wgpu::Buffer, wgpu::Buffer)],
    ) {
        let s = step.shared;
        let (t, h) = (step.t, step.dims.hidden);
        let row_bytes = (t * h * 4) as u64;
        // The embedding layer norm's output is the residual stream.
        self.word_embeddings_layernorm
            .record(rec, t, &s.hidden, &s.normed);
        rec.copy(&s.normed, 0, &s.hidden, 0, row_bytes);
        let hd = step.dims.head_dim as u32;
        let attn = AttnParams {
            heads: step.dims.heads as u32,
            kv_heads: step.dims.heads as u32,
            head_dim: hd,
            t: t as u32,
            max_seq: step.dims.max_seq as u32,
            // The fused projection viewed as [t, heads, 3, head_dim].
            row_stride: 3 * h as u32,
            head_stride: 3 * hd,
            alibi: 1,
            scale: (1.0 / f64::from(hd).sqrt()) as f32,
            ..Default::default()
        };
        for (block, (k_cache, v_cache)) in self.blocks.iter().zip(cache) {
            block.input_layernorm.record(rec, t, &s.hidden, &s.normed);
            if self.post_ln {
                rec.copy(&s.normed, 0, &s.hidden, 0, row_bytes);
            }
            block
                .query_key_value
                .record(rec, t, &s.normed, &self.qkv, false, s.lora_scratch());
            let kv = AttnParams {
                offset: hd,
                v_offset: 2 * hd,
                ..attn
            };
            rec.kv_append(
                &kv,
                step.step_buffer,
                &self.qkv,
                &self.qkv,
                k_cache,
                v_cache,
            );
            rec.attention(
                &attn,
                step.step_buffer,
                &self.qkv,
                k_cache,
                v_cache,
                &self.alibi_slopes,
                &s.scores,
                &s.context,
            );
            block
                .dense
                .record(rec, t, &s.context, &s.hidden, true, s.lora_scratch());

            block
                .post_attention_layernorm
                .record(rec, t, &s.hidden, &s.normed);
            if self.post_ln {
                rec.copy(&s.normed, 0, &s.hidden, 0, row_bytes);
            }
            block
                .dense_h_to_4h
                .record(rec, t, &s.normed, &self.mlp, false, s.lora_scratch());
            rec.gelu_tanh(t * 4 * h, &self.mlp);
            block
                .dense_4h_to_h
                .record(rec, t, &self.mlp, &s.hidden, true, s.lora_scratch());
        }
    }
}
