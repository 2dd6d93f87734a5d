//! LLaMA-family layers (`llama`, `qwen2`) as transformers' `LlamaForCausalLM`: RMSNorm, RoPE,
//! grouped-query attention, SiLU-gated MLP.

use qlora_core::arch::{LlamaConfig, LlamaDescription, RopeLayout};
use qlora_core::Result;

use super::{Dims, Loader, Step};
use crate::buffers::scratch;
use crate::kernels::{AttnParams, Recorder};
use crate::weights::{Linear, Norm};

pub(crate) struct Llama {
    blocks: Vec<Block>,
    rope_adjacent: bool,
    /// `[max_seq, head_dim / 2]` each.
    cos: wgpu::Buffer,
    sin: wgpu::Buffer,
    /// `[chunk, heads * head_dim]`
    q: wgpu::Buffer,
    /// `[chunk, kv_heads * head_dim]` each.
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    /// `[chunk, intermediate]` each.
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    intermediate: usize,
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

/// `cos` and `sin` of `position * inv_freq[j]` for every position and pair: the angle an f32
/// product (transformers' `inv_freq @ position_ids`), its cosine and sine from f64.
fn rope_tables(config: &LlamaConfig, max_seq: usize) -> (Vec<f32>, Vec<f32>) {
    let inv_freq = config.rope_inv_freq();
    let mut cos = Vec::with_capacity(max_seq * inv_freq.len());
    let mut sin = Vec::with_capacity(max_seq * inv_freq.len());
    for position in 0..max_seq {
        for &f in &inv_freq {
            let angle = f64::from(position as f32 * f);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

impl Llama {
    pub(crate) async fn load(
        loader: &mut Loader<'_, '_>,
        d: &LlamaDescription,
        dims: Dims,
    ) -> Result<Llama> {
        let mut blocks = Vec::with_capacity(d.layers.len());
        for l in &d.layers {
            blocks.push(Block {
                input_layernorm: loader.norm(&l.input_layernorm).await?,
                q_proj: loader.linear(&l.q_proj).await?,
                k_proj: loader.linear(&l.k_proj).await?,
                v_proj: loader.linear(&l.v_proj).await?,
                o_proj: loader.linear(&l.o_proj).await?,
                post_attention_layernorm: loader.norm(&l.post_attention_layernorm).await?,
                gate_proj: loader.linear(&l.gate_proj).await?,
                up_proj: loader.linear(&l.up_proj).await?,
                down_proj: loader.linear(&l.down_proj).await?,
            });
        }
        let (cos, sin) = rope_tables(&d.config, dims.max_seq);
        let c = dims.chunk;
        let intermediate = d.config.intermediate_size;
        let engine = loader.engine;
        Ok(Llama {
            blocks,
            rope_adjacent: d.config.rope_layout == RopeLayout::AdjacentPairs,
            cos: loader.f32_table("RoPE cos", &cos)?,
            sin: loader.f32_table("RoPE sin", &sin)?,
            q: scratch(engine, "q", c * dims.heads * dims.head_dim)?,
            k: scratch(engine, "k", c * dims.kv_heads * dims.head_dim)?,
            v: scratch(engine, "v", c * dims.kv_heads * dims.head_dim)?,
            gate: scratch(engine, "gate", c * intermediate)?,
            up: scratch(engine, "up", c * intermediate)?,
            intermediate,
        })
    }

    pub(crate) fn scratch_bytes(&self) -> u64 {
        [
            &self.cos, &self.sin, &self.q, &self.k, &self.v, &self.gate, &self.up,
        ]
        .iter()
        .map(|b| b.size())
        .sum()
    }

    pub(crate) fn record(
        &self,
        rec: &mut Recorder,
        step: &Step<'_>,
        cache: &[(wgpu::Buffer, wgpu::Buffer)],
    ) {
        let s = step.shared;
        let dims = step.dims;
        let t = step.t;
        let d = dims.head_dim as u32;
        let attn = AttnParams {
            heads: dims.heads as u32,
            kv_heads: dims.kv_heads as u32,
            head_dim: d,
            t: t as u32,
            max_seq: dims.max_seq as u32,
            row_stride: dims.heads as u32 * d,
            head_stride: d,
            rope_adjacent: u32::from(self.rope_adjacent),
            scale: (1.0 / f64::from(d).sqrt()) as f32,
            ..Default::default()
        };
        let kv = AttnParams {
            heads: dims.kv_heads as u32,
            row_stride: dims.kv_heads as u32 * d,
            ..attn
        };
        for (block, (k_cache, v_cache)) in self.blocks.iter().zip(cache) {
            block.input_layernorm.record(rec, t, &s.hidden, &s.normed);
            block
                .q_proj
                .record(rec, t, &s.normed, &self.q, false, s.lora_scratch());
            block
                .k_proj
                .record(rec, t, &s.normed, &self.k, false, s.lora_scratch());
            block
                .v_proj
                .record(rec, t, &s.normed, &self.v, false, s.lora_scratch());
            rec.rope(&attn, step.step_buffer, &self.q, &self.cos, &self.sin);
            rec.rope(&kv, step.step_buffer, &self.k, &self.cos, &self.sin);
            rec.kv_append(&kv, step.step_buffer, &self.k, &self.v, k_cache, v_cache);
            // No ALiBi: the slopes binding is unused.
            rec.attention(
                &attn,
                step.step_buffer,
                &self.q,
                k_cache,
                v_cache,
                &self.cos,
                &s.scores,
                &s.context,
            );
            block
                .o_proj
                .record(rec, t, &s.context, &s.hidden, true, s.lora_scratch());

            block
                .post_attention_layernorm
                .record(rec, t, &s.hidden, &s.normed);
            block
                .gate_proj
                .record(rec, t, &s.normed, &self.gate, false, s.lora_scratch());
            block
                .up_proj
                .record(rec, t, &s.normed, &self.up, false, s.lora_scratch());
            rec.silu_mul(t * self.intermediate, &self.gate, &self.up);
            block
                .down_proj
                .record(rec, t, &self.gate, &s.hidden, true, s.lora_scratch());
        }
    }
}
