//! Causal self-attention on heads laid out `[B, heads, T, hd]`, as batched GEMMs around the
//! masked softmax. Grouped-query attention needs no copy of k and v: the `group` query heads
//! that share a key/value head are stacked along the rows, `[B, kv_heads, group * T, hd]`.

use qlora_core::Result;
use qlora_kernels::{CachedAttention, DeviceBuffer, Gemm, Precision, SoftmaxArgs};

use super::linear::Ctx;

/// Where RoPE tables `[B, T, hd]` (f32) for each row's own positions are on the device, and
/// whether pairs are `(c, c + hd/2)` (else `(2j, 2j+1)`).
#[derive(Clone, Copy)]
pub(crate) struct Rope {
    pub cos: u64,
    pub sin: u64,
    pub half_split: bool,
}

impl Rope {
    /// Rotates `x [B, heads, T, hd]` in place (`inverse`: back, for the backward pass).
    pub(crate) fn apply(
        &self,
        ctx: &Ctx<'_>,
        x: u64,
        s: Shape,
        heads: usize,
        inverse: bool,
    ) -> Result<()> {
        ctx.k.rope(
            x,
            self.cos,
            self.sin,
            s.batch * heads * s.seq,
            heads,
            s.seq,
            s.hd,
            self.half_split,
            inverse,
        )
    }
}

/// The keys a query may see besides causality: `[B, stride]` f32 each, the first `keys` of a
/// row used (`stride` is `keys` except in a recorded decoding step, where the rows are as long
/// as the KV cache).
#[derive(Clone, Copy)]
pub(crate) struct KeyMask {
    /// 1 real key, 0 padding.
    pub mask: u64,
    /// Each key's position counting real tokens only (read only with ALiBi slopes; else 0).
    pub positions: u64,
    pub stride: usize,
}

#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub batch: usize,
    pub seq: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub hd: usize,
}

impl Shape {
    fn rows(&self) -> usize {
        self.group * self.seq
    }
    fn batches(&self) -> usize {
        self.batch * self.kv_heads
    }
    pub(crate) fn q_len(&self) -> usize {
        self.batch * self.kv_heads * self.group * self.seq * self.hd
    }
    pub(crate) fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.seq * self.hd
    }
    fn scores_len(&self) -> usize {
        self.batches() * self.rows() * self.seq
    }
}

/// The attention's saved state: its inputs (heads layout) and the probabilities.
pub(crate) struct Saved {
    pub q: DeviceBuffer,
    pub k: DeviceBuffer,
    pub v: DeviceBuffer,
    probs: DeviceBuffer,
}

/// `context [B, heads, T, hd] = softmax(scale q k^T + alibi + mask) v`.
pub(crate) fn forward(
    ctx: &Ctx<'_>,
    s: Shape,
    [q, k, v]: [DeviceBuffer; 3],
    keys: KeyMask,
    slopes: Option<&DeviceBuffer>,
    context: u64,
) -> Result<Saved> {
    let (rows, t, hd, nb) = (s.rows(), s.seq, s.hd, s.batches());
    let scores = ctx.gpu.alloc(4 * s.scores_len(), "attention scores")?;
    ctx.gpu.gemm(
        &Gemm::new(
            rows,
            t,
            hd,
            q.ptr(),
            false,
            k.ptr(),
            true,
            scores.ptr(),
            ctx.p(),
            Precision::F32,
        )
        .batched(nb, rows * hd, t * hd, rows * t),
    )?;
    let probs = ctx.act(s.scores_len(), "attention probabilities")?;
    ctx.k.softmax_fwd(&SoftmaxArgs {
        scores: scores.ptr(),
        probs: probs.ptr(),
        key_mask: keys.mask,
        slopes: slopes.map_or(0, |b| b.ptr()),
        positions: keys.positions,
        batch: s.batch,
        kv_heads: s.kv_heads,
        group: s.group,
        seq: t,
        keys: t,
        scale: 1.0 / (hd as f32).sqrt(),
    })?;
    drop(scores);
    ctx.gpu.gemm(
        &ctx.gemm(rows, hd, t, probs.ptr(), false, v.ptr(), false, context)
            .batched(nb, rows * t, t * hd, rows * hd),
    )?;
    Ok(Saved { q, k, v, probs })
}

/// One layer's KV cache: keys and values `[B, kv_heads, capacity, hd]` in the activation
/// precision, the first `len` columns filled.
pub(crate) struct LayerCache {
    pub k: DeviceBuffer,
    pub v: DeviceBuffer,
}

/// Where a step's new tokens go in the KV cache: `past` tokens are cached before them, a number
/// the kernels read from the device (`past_len`, one i32) so that a recorded step serves every
/// position; the host's copy only chooses the path (the first step takes the batched one).
#[derive(Clone, Copy)]
pub(crate) struct CachePosition {
    pub past: usize,
    pub past_len: u64,
    pub capacity: usize,
}

/// A step's queries, keys and values, element `(b * heads + h, t, d)` of each at
/// `(b * heads + h) * head_stride + t * hd + d`: packed heads layout `[B, heads, T, hd]`
/// (`head_stride = T * hd`), or at one token per row a view into the projections' output (BLOOM's
/// fused `[B, heads, 3, hd]` has `head_stride = 3 * hd`), which needs no copy.
#[derive(Clone, Copy)]
pub(crate) struct HeadsView {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub head_stride: usize,
}

/// Appends this step's keys and values to `cache` at `at`.
pub(crate) fn append(
    ctx: &Ctx<'_>,
    s: Shape,
    heads: HeadsView,
    cache: &LayerCache,
    at: CachePosition,
) -> Result<()> {
    ctx.k.kv_append(
        [heads.k, heads.v],
        [cache.k.ptr(), cache.v.ptr()],
        s.batch * s.kv_heads,
        s.seq,
        at.capacity,
        at.past_len,
        s.hd,
        heads.head_stride,
    )
}

/// Attention of this step's queries over every token in `cache` (this step's keys and values
/// already appended), the context into `context [B, heads, T, hd]`. Never differentiated.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_cached(
    ctx: &Ctx<'_>,
    s: Shape,
    heads: HeadsView,
    keys: KeyMask,
    slopes: Option<&DeviceBuffer>,
    cache: &LayerCache,
    at: CachePosition,
    context: u64,
) -> Result<()> {
    let attention = CachedAttention {
        q: heads.q,
        q_head_stride: heads.head_stride,
        k_cache: cache.k.ptr(),
        v_cache: cache.v.ptr(),
        context,
        key_mask: keys.mask,
        slopes: slopes.map_or(0, |b| b.ptr()),
        positions: keys.positions,
        mask_stride: keys.stride,
        batch: s.batch,
        heads: s.kv_heads * s.group,
        kv_heads: s.kv_heads,
        seq: s.seq,
        past_len: at.past_len,
        capacity: at.capacity,
        hd: s.hd,
        scale: 1.0 / (s.hd as f32).sqrt(),
    };
    let partial = match attention.partial_bytes() {
        0 => None,
        bytes => Some(ctx.gpu.alloc(bytes, "split attention")?),
    };
    ctx.k
        .attention_cached(&attention, partial.as_ref().map_or(0, |p| p.ptr()))
}

/// Gradients of q, k, v (heads layout) from that of the context.
pub(crate) fn backward(
    ctx: &Ctx<'_>,
    s: Shape,
    saved: &Saved,
    dcontext: u64,
) -> Result<[DeviceBuffer; 3]> {
    let (rows, t, hd, nb) = (s.rows(), s.seq, s.hd, s.batches());
    let probs = &saved.probs;
    let dprobs = ctx.gpu.alloc(4 * s.scores_len(), "attention gradient")?;
    ctx.gpu.gemm(
        &Gemm::new(
            rows,
            t,
            hd,
            dcontext,
            false,
            saved.v.ptr(),
            true,
            dprobs.ptr(),
            ctx.p(),
            Precision::F32,
        )
        .batched(nb, rows * hd, t * hd, rows * t),
    )?;
    let dv = ctx.act(s.kv_len(), "dv")?;
    ctx.gpu.gemm(
        &ctx.gemm(t, hd, rows, probs.ptr(), true, dcontext, false, dv.ptr())
            .batched(nb, rows * t, rows * hd, t * hd),
    )?;
    let dscores = ctx.act(s.scores_len(), "attention gradient")?;
    ctx.k.softmax_bwd(
        probs.ptr(),
        dprobs.ptr(),
        dscores.ptr(),
        nb * rows,
        t,
        1.0 / (hd as f32).sqrt(),
    )?;
    drop(dprobs);
    let dq = ctx.act(s.q_len(), "dq")?;
    ctx.gpu.gemm(
        &ctx.gemm(
            rows,
            hd,
            t,
            dscores.ptr(),
            false,
            saved.k.ptr(),
            false,
            dq.ptr(),
        )
        .batched(nb, rows * t, t * hd, rows * hd),
    )?;
    let dk = ctx.act(s.kv_len(), "dk")?;
    ctx.gpu.gemm(
        &ctx.gemm(
            t,
            hd,
            rows,
            dscores.ptr(),
            true,
            saved.q.ptr(),
            false,
            dk.ptr(),
        )
        .batched(nb, rows * t, rows * hd, t * hd),
    )?;
    Ok([dq, dk, dv])
}
