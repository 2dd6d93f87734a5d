//! Transformer blocks with explicit forward and backward passes: BLOOM's (LayerNorm, fused
//! interleaved query_key_value, ALiBi, tanh GELU) and the LLaMA family's (RMSNorm, separate
//! q/k/v with RoPE and grouped-query attention, SiLU-gated MLP). A block's backward pass turns
//! the gradient of its output, in place, into the gradient of its input.

use qlora_core::arch::NormKind;
use qlora_core::{Error, Result};
use qlora_kernels::DeviceBuffer;

use super::attention::{self, CachePosition, HeadsView, KeyMask, LayerCache, Rope, Shape};
use super::linear::{Ctx, Epilogue, GradOut, Linear, LinearSaved};
use super::weights::Norm;
use qlora_kernels::Precision;

/// A normalization's output and the row statistics its backward pass needs.
pub(crate) struct NormSaved {
    pub out: DeviceBuffer,
    mean: Option<DeviceBuffer>,
    rstd: DeviceBuffer,
}

impl Norm {
    pub(crate) fn forward(&self, ctx: &Ctx<'_>, x: u64, n: usize) -> Result<NormSaved> {
        let out = ctx.act(n * self.dim, "normalized activations")?;
        let rstd = ctx.gpu.alloc(4 * n, "norm statistics")?;
        let mean = match self.kind {
            NormKind::LayerNorm => {
                let mean = ctx.gpu.alloc(4 * n, "norm statistics")?;
                let bias = self.bias.as_ref().map_or(0, |b| b.ptr());
                ctx.k.layernorm_fwd(
                    x,
                    self.weight.ptr(),
                    bias,
                    out.ptr(),
                    mean.ptr(),
                    rstd.ptr(),
                    n,
                    self.dim,
                    self.eps,
                )?;
                Some(mean)
            }
            NormKind::RmsNorm => {
                ctx.k.rmsnorm_fwd(
                    x,
                    self.weight.ptr(),
                    out.ptr(),
                    rstd.ptr(),
                    n,
                    self.dim,
                    self.eps,
                )?;
                None
            }
        };
        Ok(NormSaved { out, mean, rstd })
    }

    /// `dx (+)= d norm(x) / dx . dy`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        ctx: &Ctx<'_>,
        x: u64,
        saved: &NormSaved,
        dy: u64,
        dx: u64,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        match &saved.mean {
            Some(mean) => ctx.k.layernorm_bwd(
                dy,
                x,
                self.weight.ptr(),
                mean.ptr(),
                saved.rstd.ptr(),
                dx,
                n,
                self.dim,
                accumulate,
            ),
            None => ctx.k.rmsnorm_bwd(
                dy,
                x,
                self.weight.ptr(),
                saved.rstd.ptr(),
                dx,
                n,
                self.dim,
                accumulate,
            ),
        }
    }
}

/// The gradient of a norm's output, which several projections add into: summed in f32, then
/// handed to the norm's backward pass in the activation precision (one rounding, not one per
/// projection).
struct NormGrad {
    sum: DeviceBuffer,
    /// The sum in the activation precision (bf16 runs).
    rounded: Option<DeviceBuffer>,
    len: usize,
}

impl NormGrad {
    fn new(ctx: &Ctx<'_>, len: usize) -> Result<NormGrad> {
        Ok(NormGrad {
            sum: ctx.gpu.alloc(4 * len, "norm gradient")?,
            rounded: None,
            len,
        })
    }

    fn out(&self, accumulate: bool) -> GradOut {
        GradOut {
            ptr: self.sum.ptr(),
            precision: Precision::F32,
            accumulate,
        }
    }

    /// The sum so far, as the activation precision.
    fn in_precision(&mut self, ctx: &Ctx<'_>) -> Result<u64> {
        if ctx.p() == Precision::F32 {
            return Ok(self.sum.ptr());
        }
        let rounded = match self.rounded.take() {
            Some(r) => r,
            None => ctx.act(self.len, "norm gradient")?,
        };
        ctx.k
            .cast_from_f32(self.sum.ptr(), rounded.ptr(), self.len)?;
        let ptr = rounded.ptr();
        self.rounded = Some(rounded);
        Ok(ptr)
    }
}

pub(crate) struct BloomBlock {
    pub input_layernorm: Norm,
    pub query_key_value: Linear,
    pub dense: Linear,
    pub post_attention_layernorm: Norm,
    pub dense_h_to_4h: Linear,
    pub dense_4h_to_h: Linear,
    pub n_head: usize,
    pub hidden: usize,
}

pub(crate) struct LlamaBlock {
    pub input_layernorm: Norm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: Norm,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub intermediate: usize,
}

/// Per-model inputs of a block besides its hidden state.
pub(crate) struct BlockInputs<'a> {
    pub batch_size: usize,
    /// New tokens per row.
    pub seq_len: usize,
    /// Which keys are real, and their ALiBi positions: `[B, T]`, or over every cached token
    /// when generating.
    pub keys: KeyMask,
    /// BLOOM's ALiBi slopes `[nh]` (f32).
    pub alibi_slopes: Option<&'a DeviceBuffer>,
    /// The LLaMA family's RoPE tables for the new tokens.
    pub rope: Option<Rope>,
}

/// Generation: the KV cache of the layer a block runs as, and where the new tokens go in it.
#[derive(Clone, Copy)]
pub(crate) struct CacheSlot<'a> {
    pub layer: &'a LayerCache,
    pub at: CachePosition,
}

/// A step's queries, keys and values as a block hands them to its attention.
enum Qkv {
    /// Each in packed heads layout `[B, heads, T, hd]`.
    Packed([DeviceBuffer; 3]),
    /// Viewed in place in the projections' output (generation, one token per row: no copy).
    View(HeadsView),
}

/// The attention of a block: over this batch's tokens, or (generation) appending them to the KV
/// cache and attending over everything cached. Returns the saved state (`None` after attention
/// over the KV cache, which is never differentiated) and the context in token layout
/// `[B, T, heads, hd]`.
fn attend(
    ctx: &Ctx<'_>,
    inp: &BlockInputs<'_>,
    shape: Shape,
    qkv: Qkv,
    cache: Option<CacheSlot<'_>>,
) -> Result<(Option<attention::Saved>, DeviceBuffer)> {
    let heads = shape.kv_heads * shape.group;
    let context = ctx.act(shape.q_len(), "attention context")?;
    // One new token per row (decoding): the head layout is the token layout.
    let direct = shape.seq == 1;
    let heads_ctx = if direct {
        None
    } else {
        Some(ctx.act(shape.q_len(), "attention context")?)
    };
    let target = heads_ctx.as_ref().unwrap_or(&context).ptr();
    let (keys, slopes) = (inp.keys, inp.alibi_slopes);
    let saved = match (qkv, cache) {
        (Qkv::Packed(qkv), None) => {
            Some(attention::forward(ctx, shape, qkv, keys, slopes, target)?)
        }
        (Qkv::View(_), None) => {
            return Err(Error::Invalid(
                "attention over a view of the projections needs a KV cache".into(),
            ))
        }
        (qkv, Some(c)) => {
            let view = match &qkv {
                Qkv::Packed([q, k, v]) => HeadsView {
                    q: q.ptr(),
                    k: k.ptr(),
                    v: v.ptr(),
                    head_stride: shape.seq * shape.hd,
                },
                Qkv::View(view) => *view,
            };
            attention::append(ctx, shape, view, c.layer, c.at)?;
            match qkv {
                // The prompts: the batched path.
                Qkv::Packed(qkv) if c.at.past == 0 => {
                    Some(attention::forward(ctx, shape, qkv, keys, slopes, target)?)
                }
                _ => {
                    attention::forward_cached(
                        ctx, shape, view, keys, slopes, c.layer, c.at, target,
                    )?;
                    None
                }
            }
        }
    };
    if let Some(heads_ctx) = heads_ctx {
        ctx.k.tokens_from_heads(
            heads_ctx.ptr(),
            context.ptr(),
            shape.batch,
            shape.seq,
            heads,
            1,
            0,
            shape.hd,
        )?;
    }
    Ok((saved, context))
}

/// The attention state a backward pass needs: missing only after a generation step.
fn saved_attention(attn: &Option<attention::Saved>) -> Result<&attention::Saved> {
    attn.as_ref().ok_or_else(|| {
        Error::Invalid(
            "a generation step (attention over the KV cache) has no backward pass".into(),
        )
    })
}

pub(crate) enum Block {
    Bloom(Box<BloomBlock>),
    Llama(Box<LlamaBlock>),
}

/// What a block's backward pass needs from its forward pass.
pub(crate) enum Saved {
    Bloom {
        ln1: NormSaved,
        qkv_lin: LinearSaved,
        /// `None` after a generation step (never differentiated).
        attn: Option<attention::Saved>,
        context: DeviceBuffer,
        dense_lin: LinearSaved,
        mid: DeviceBuffer,
        ln2: NormSaved,
        /// `None` after a generation step (never differentiated).
        up_pre: Option<DeviceBuffer>,
        up: DeviceBuffer,
        up_lin: LinearSaved,
        down_lin: LinearSaved,
    },
    Llama {
        ln1: NormSaved,
        q_lin: LinearSaved,
        k_lin: LinearSaved,
        v_lin: LinearSaved,
        /// `None` after a generation step (never differentiated).
        attn: Option<attention::Saved>,
        context: DeviceBuffer,
        o_lin: LinearSaved,
        mid: DeviceBuffer,
        ln2: NormSaved,
        gate: DeviceBuffer,
        up: DeviceBuffer,
        act: DeviceBuffer,
        gate_lin: LinearSaved,
        up_lin: LinearSaved,
        down_lin: LinearSaved,
    },
}

impl Block {
    /// The block's projections.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        match self {
            Block::Bloom(b) => vec![
                &b.query_key_value,
                &b.dense,
                &b.dense_h_to_4h,
                &b.dense_4h_to_h,
            ],
            Block::Llama(b) => vec![
                &b.q_proj,
                &b.k_proj,
                &b.v_proj,
                &b.o_proj,
                &b.gate_proj,
                &b.up_proj,
                &b.down_proj,
            ],
        }
    }

    /// The block's projections, to set them up after loading.
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Block::Bloom(b) => vec![
                &mut b.query_key_value,
                &mut b.dense,
                &mut b.dense_h_to_4h,
                &mut b.dense_4h_to_h,
            ],
            Block::Llama(b) => vec![
                &mut b.q_proj,
                &mut b.k_proj,
                &mut b.v_proj,
                &mut b.o_proj,
                &mut b.gate_proj,
                &mut b.up_proj,
                &mut b.down_proj,
            ],
        }
    }

    /// Key/value heads and head size: the shape of this block's KV cache per token.
    pub(crate) fn kv_shape(&self) -> (usize, usize) {
        match self {
            Block::Bloom(b) => (b.n_head, b.hidden / b.n_head),
            Block::Llama(b) => (b.kv_heads, b.head_dim),
        }
    }

    /// `out [N, H]` = the block applied to `x [N, H]`; with `cache`, the new tokens' keys and
    /// values join it and attention covers every cached token.
    pub(crate) fn forward(
        &self,
        ctx: &Ctx<'_>,
        inp: &BlockInputs<'_>,
        x: u64,
        out: u64,
        cache: Option<CacheSlot<'_>>,
    ) -> Result<Saved> {
        let (b, t) = (inp.batch_size, inp.seq_len);
        let n = b * t;
        match self {
            Block::Bloom(blk) => {
                let h = blk.hidden;
                let hd = h / blk.n_head;
                let ln1 = blk.input_layernorm.forward(ctx, x, n)?;
                let qkv = ctx.act(n * 3 * h, "query_key_value")?;
                let qkv_lin = blk
                    .query_key_value
                    .forward(ctx, ln1.out.ptr(), n, qkv.ptr())?;
                let shape = Shape {
                    batch: b,
                    seq: t,
                    kv_heads: blk.n_head,
                    group: 1,
                    hd,
                };
                let qkv_heads = if cache.is_some() && t == 1 {
                    // [B, 1, nh, 3, hd]: each of q, k, v is [B, nh, hd] with a stride.
                    let slot = |g: usize| qkv.at(ctx.k.bytes(g * hd));
                    Qkv::View(HeadsView {
                        q: slot(0),
                        k: slot(1),
                        v: slot(2),
                        head_stride: 3 * hd,
                    })
                } else {
                    // [B, T, nh, 3, hd] -> q, k, v [B, nh, T, hd]
                    let split = |g: usize| -> Result<DeviceBuffer> {
                        let dst = ctx.act(shape.q_len(), "attention heads")?;
                        ctx.k.heads_from_tokens(
                            qkv.ptr(),
                            dst.ptr(),
                            b,
                            t,
                            blk.n_head,
                            3,
                            g,
                            hd,
                        )?;
                        Ok(dst)
                    };
                    Qkv::Packed([split(0)?, split(1)?, split(2)?])
                };
                let (attn, context) = attend(ctx, inp, shape, qkv_heads, cache)?;
                drop(qkv);
                let mid = ctx.act(n * h, "residual")?;
                let dense_lin = blk.dense.forward_then(
                    ctx,
                    context.ptr(),
                    n,
                    mid.ptr(),
                    Epilogue::residual(x),
                )?;
                let ln2 = blk.post_attention_layernorm.forward(ctx, mid.ptr(), n)?;
                let up = ctx.act(n * 4 * h, "MLP")?;
                // Generation keeps no pre-activation (no backward pass follows).
                let (up_pre, up_lin) = if cache.is_some() {
                    let gelu = Epilogue {
                        gelu: true,
                        residual: None,
                    };
                    let lin =
                        blk.dense_h_to_4h
                            .forward_then(ctx, ln2.out.ptr(), n, up.ptr(), gelu)?;
                    (None, lin)
                } else {
                    let up_pre = ctx.act(n * 4 * h, "MLP")?;
                    let lin = blk
                        .dense_h_to_4h
                        .forward(ctx, ln2.out.ptr(), n, up_pre.ptr())?;
                    ctx.k.gelu_fwd(up_pre.ptr(), up.ptr(), n * 4 * h)?;
                    (Some(up_pre), lin)
                };
                let down_lin = blk.dense_4h_to_h.forward_then(
                    ctx,
                    up.ptr(),
                    n,
                    out,
                    Epilogue::residual(mid.ptr()),
                )?;
                Ok(Saved::Bloom {
                    ln1,
                    qkv_lin,
                    attn,
                    context,
                    dense_lin,
                    mid,
                    ln2,
                    up_pre,
                    up,
                    up_lin,
                    down_lin,
                })
            }
            Block::Llama(blk) => {
                let (h, hd) = (blk.hidden, blk.head_dim);
                let group = blk.heads / blk.kv_heads;
                let shape = Shape {
                    batch: b,
                    seq: t,
                    kv_heads: blk.kv_heads,
                    group,
                    hd,
                };
                let ln1 = blk.input_layernorm.forward(ctx, x, n)?;
                let project = |lin: &Linear, heads: usize| -> Result<(DeviceBuffer, LinearSaved)> {
                    let tokens = ctx.act(n * heads * hd, "attention projection")?;
                    let saved = lin.forward(ctx, ln1.out.ptr(), n, tokens.ptr())?;
                    if t == 1 {
                        // [B, 1, heads, hd] is the heads layout already.
                        return Ok((tokens, saved));
                    }
                    let dst = ctx.act(n * heads * hd, "attention heads")?;
                    ctx.k
                        .heads_from_tokens(tokens.ptr(), dst.ptr(), b, t, heads, 1, 0, hd)?;
                    Ok((dst, saved))
                };
                let (q, q_lin) = project(&blk.q_proj, blk.heads)?;
                let (k, k_lin) = project(&blk.k_proj, blk.kv_heads)?;
                let (v, v_lin) = project(&blk.v_proj, blk.kv_heads)?;
                if let Some(rope) = inp.rope {
                    rope.apply(ctx, q.ptr(), shape, blk.heads, false)?;
                    rope.apply(ctx, k.ptr(), shape, blk.kv_heads, false)?;
                }
                let (attn, context) = attend(ctx, inp, shape, Qkv::Packed([q, k, v]), cache)?;
                let mid = ctx.act(n * h, "residual")?;
                let o_lin = blk.o_proj.forward_then(
                    ctx,
                    context.ptr(),
                    n,
                    mid.ptr(),
                    Epilogue::residual(x),
                )?;
                let ln2 = blk.post_attention_layernorm.forward(ctx, mid.ptr(), n)?;
                let i = blk.intermediate;
                let gate = ctx.act(n * i, "MLP")?;
                let gate_lin = blk.gate_proj.forward(ctx, ln2.out.ptr(), n, gate.ptr())?;
                let up = ctx.act(n * i, "MLP")?;
                let up_lin = blk.up_proj.forward(ctx, ln2.out.ptr(), n, up.ptr())?;
                let act = ctx.act(n * i, "MLP")?;
                ctx.k.swiglu_fwd(gate.ptr(), up.ptr(), act.ptr(), n * i)?;
                let down_lin = blk.down_proj.forward_then(
                    ctx,
                    act.ptr(),
                    n,
                    out,
                    Epilogue::residual(mid.ptr()),
                )?;
                Ok(Saved::Llama {
                    ln1,
                    q_lin,
                    k_lin,
                    v_lin,
                    attn,
                    context,
                    o_lin,
                    mid,
                    ln2,
                    gate,
                    up,
                    act,
                    gate_lin,
                    up_lin,
                    down_lin,
                })
            }
        }
    }

    /// Accumulates the LoRA gradients and turns `grad` (`dL/d out`, `[N, H]`) into `dL/dx`
    /// in place; with `input_grad = false` (the first block) only the LoRA gradients.
    pub(crate) fn backward(
        &self,
        ctx: &Ctx<'_>,
        inp: &BlockInputs<'_>,
        x: u64,
        saved: &Saved,
        grad: u64,
        input_grad: bool,
    ) -> Result<()> {
        let (b, t) = (inp.batch_size, inp.seq_len);
        let n = b * t;
        match (self, saved) {
            (
                Block::Bloom(blk),
                Saved::Bloom {
                    ln1,
                    qkv_lin,
                    attn,
                    context,
                    dense_lin,
                    mid,
                    ln2,
                    up_pre,
                    up,
                    up_lin,
                    down_lin,
                },
            ) => {
                let h = blk.hidden;
                let hd = h / blk.n_head;
                let shape = Shape {
                    batch: b,
                    seq: t,
                    kv_heads: blk.n_head,
                    group: 1,
                    hd,
                };
                // MLP: grad is dL/d out = dL/d mid's residual part.
                let dup = ctx.act(n * 4 * h, "MLP gradient")?;
                blk.dense_4h_to_h.backward(
                    ctx,
                    up.ptr(),
                    grad,
                    n,
                    down_lin,
                    Some(GradOut {
                        ptr: dup.ptr(),
                        precision: ctx.p(),
                        accumulate: false,
                    }),
                )?;
                let up_pre = up_pre
                    .as_ref()
                    .expect("a training forward pass keeps the pre-activation");
                ctx.k
                    .gelu_bwd(up_pre.ptr(), dup.ptr(), dup.ptr(), n * 4 * h)?;
                let mut dln2 = NormGrad::new(ctx, n * h)?;
                blk.dense_h_to_4h.backward(
                    ctx,
                    ln2.out.ptr(),
                    dup.ptr(),
                    n,
                    up_lin,
                    Some(dln2.out(false)),
                )?;
                drop(dup);
                let dy = dln2.in_precision(ctx)?;
                blk.post_attention_layernorm
                    .backward(ctx, mid.ptr(), ln2, dy, grad, n, true)?;
                // grad is now dL/d mid.
                let dcontext = ctx.act(n * h, "attention gradient")?;
                blk.dense.backward(
                    ctx,
                    context.ptr(),
                    grad,
                    n,
                    dense_lin,
                    Some(GradOut {
                        ptr: dcontext.ptr(),
                        precision: ctx.p(),
                        accumulate: false,
                    }),
                )?;
                let dheads = ctx.act(n * h, "attention gradient")?;
                ctx.k.heads_from_tokens(
                    dcontext.ptr(),
                    dheads.ptr(),
                    b,
                    t,
                    blk.n_head,
                    1,
                    0,
                    hd,
                )?;
                drop(dcontext);
                let dqkv_heads =
                    attention::backward(ctx, shape, saved_attention(attn)?, dheads.ptr())?;
                drop(dheads);
                let dqkv = ctx.act(n * 3 * h, "query_key_value gradient")?;
                for (g, d) in dqkv_heads.iter().enumerate() {
                    ctx.k
                        .tokens_from_heads(d.ptr(), dqkv.ptr(), b, t, blk.n_head, 3, g, hd)?;
                }
                drop(dqkv_heads);
                if input_grad {
                    blk.query_key_value.backward(
                        ctx,
                        ln1.out.ptr(),
                        dqkv.ptr(),
                        n,
                        qkv_lin,
                        Some(dln2.out(false)),
                    )?;
                    let dy = dln2.in_precision(ctx)?;
                    blk.input_layernorm
                        .backward(ctx, x, ln1, dy, grad, n, true)?;
                } else {
                    blk.query_key_value.backward(
                        ctx,
                        ln1.out.ptr(),
                        dqkv.ptr(),
                        n,
                        qkv_lin,
                        None,
                    )?;
                }
                Ok(())
            }
            (
                Block::Llama(blk),
                Saved::Llama {
                    ln1,
                    q_lin,
                    k_lin,
                    v_lin,
                    attn,
                    context,
                    o_lin,
                    mid,
                    ln2,
                    gate,
                    up,
                    act,
                    gate_lin,
                    up_lin,
                    down_lin,
                },
            ) => {
                let (h, hd, i) = (blk.hidden, blk.head_dim, blk.intermediate);
                let group = blk.heads / blk.kv_heads;
                let shape = Shape {
                    batch: b,
                    seq: t,
                    kv_heads: blk.kv_heads,
                    group,
                    hd,
                };
                let dact = ctx.act(n * i, "MLP gradient")?;
                blk.down_proj.backward(
                    ctx,
                    act.ptr(),
                    grad,
                    n,
                    down_lin,
                    Some(GradOut {
                        ptr: dact.ptr(),
                        precision: ctx.p(),
                        accumulate: false,
                    }),
                )?;
                let dgate = ctx.act(n * i, "MLP gradient")?;
                ctx.k.swiglu_bwd(
                    gate.ptr(),
                    up.ptr(),
                    dact.ptr(),
                    dgate.ptr(),
                    dact.ptr(),
                    n * i,
                )?;
                let mut dln2 = NormGrad::new(ctx, n * h)?;
                blk.gate_proj.backward(
                    ctx,
                    ln2.out.ptr(),
                    dgate.ptr(),
                    n,
                    gate_lin,
                    Some(dln2.out(false)),
                )?;
                blk.up_proj.backward(
                    ctx,
                    ln2.out.ptr(),
                    dact.ptr(),
                    n,
                    up_lin,
                    Some(dln2.out(true)),
                )?;
                drop((dact, dgate));
                let dy = dln2.in_precision(ctx)?;
                blk.post_attention_layernorm
                    .backward(ctx, mid.ptr(), ln2, dy, grad, n, true)?;
                let dcontext = ctx.act(n * blk.heads * hd, "attention gradient")?;
                blk.o_proj.backward(
                    ctx,
                    context.ptr(),
                    grad,
                    n,
                    o_lin,
                    Some(GradOut {
                        ptr: dcontext.ptr(),
                        precision: ctx.p(),
                        accumulate: false,
                    }),
                )?;
                let dheads = ctx.act(shape.q_len(), "attention gradient")?;
                ctx.k
                    .heads_from_tokens(dcontext.ptr(), dheads.ptr(), b, t, blk.heads, 1, 0, hd)?;
                drop(dcontext);
                let [dq, dk, dv] =
                    attention::backward(ctx, shape, saved_attention(attn)?, dheads.ptr())?;
                drop(dheads);
                if let Some(rope) = inp.rope {
                    rope.apply(ctx, dq.ptr(), shape, blk.heads, true)?;
                    rope.apply(ctx, dk.ptr(), shape, blk.kv_heads, true)?;
                }
                let mut first = true;
                for (d, heads, lin, lsaved) in [
                    (&dq, blk.heads, &blk.q_proj, q_lin),
                    (&dk, blk.kv_heads, &blk.k_proj, k_lin),
                    (&dv, blk.kv_heads, &blk.v_proj, v_lin),
                ] {
                    let tokens = ctx.act(n * heads * hd, "attention gradient")?;
                    ctx.k
                        .tokens_from_heads(d.ptr(), tokens.ptr(), b, t, heads, 1, 0, hd)?;
                    let dx = input_grad.then(|| dln2.out(!first));
                    lin.backward(ctx, ln1.out.ptr(), tokens.ptr(), n, lsaved, dx)?;
                    first = false;
                }
                if input_grad {
                    let dy = dln2.in_precision(ctx)?;
                    blk.input_layernorm
                        .backward(ctx, x, ln1, dy, grad, n, true)?;
                }
                Ok(())
            }
            _ => unreachable!("a block's saved state comes from its own forward pass"),
        }
    }
}
