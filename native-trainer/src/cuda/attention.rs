//! Causal self-attention on heads laid out `[B, heads, T, hd]`, as batched GEMMs around the
//! masked softmax. Grouped-query attention needs no copy of k and v: the `group` query heads
//! that share a key/value head are stacked along the rows, `[B, kv_heads, group * T, hd]`.

use qlora_core::Result;
use qlora_kernels::{CachedAttention, DeviceBuffer, Gemm, Precision, SoftmaxArgs};

use super::linear::Ctx;

/// RoPE tables `[B, T, hd]` (f32) for each row's own positions, and whether pairs are
/// `(c, c + hd/2)` (else `(2j, 2j+1)`).
pub(crate) struct Rope {
    pub cos: DeviceBuffer,
    pub sin: DeviceBuffer,
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
            self.cos.ptr(),
            self.sin.ptr(),
            s.batch * heads * s.seq,
            heads,
            s.seq,
            s.hd,
            self.half_split,
            inverse,
        )
    }
}

/// The keys a query may see besides causality: `[B, keys]` f32 each.
#[derive(Clone, Copy)]
pub(crate) struct KeyMask {
    /// 1 real key, 0 padding.
    pub mask: u64,
    /// Each key's position counting real tokens only (read only with ALiBi slopes; else 0).
    pub positions: u64,
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

/// The attention's saved state: its inputs (heads layout) and the probabilities (`None` after
/// attention over a KV cache, which is never differentiated).
pub(crate) struct Saved {
    pub q: DeviceBuffer,
    pub k: DeviceBuffer,
    pub v: DeviceBuffer,
    probs: Option<DeviceBuffer>,
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
    Ok(Saved {
        q,
        k,
        v,
        probs: Some(probs),
    })
}

/// One layer's KV cache: keys and values `[B, kv_heads, capacity, hd]` in the activation
/// precision, the first `len` columns filled.
pub(crate) struct LayerCache {
    pub k: DeviceBuffer,
    pub v: DeviceBuffer,
}

/// Appends this step's `k`, `v` (`[B, kv_heads, T, hd]`, `past` tokens already cached) to
/// `cache` and writes the context of the new queries over every cached token. The first step
/// (an empty cache: the prompts) takes the batched path of [`forward`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_cached(
    ctx: &Ctx<'_>,
    s: Shape,
    [q, k, v]: [DeviceBuffer; 3],
    keys: KeyMask,
    slopes: Option<&DeviceBuffer>,
    cache: &LayerCache,
    past: usize,
    capacity: usize,
    context: u64,
) -> Result<Saved> {
    let rows = s.batch * s.kv_heads;
    ctx.k
        .kv_append(k.ptr(), cache.k.ptr(), rows, s.seq, capacity, past, s.hd)?;
    ctx.k
        .kv_append(v.ptr(), cache.v.ptr(), rows, s.seq, capacity, past, s.hd)?;
    if past == 0 {
        return forward(ctx, s, [q, k, v], keys, slopes, context);
    }
    ctx.k.attention_cached(&CachedAttention {
        q: q.ptr(),
        k_cache: cache.k.ptr(),
        v_cache: cache.v.ptr(),
        context,
        key_mask: keys.mask,
        slopes: slopes.map_or(0, |b| b.ptr()),
        positions: keys.positions,
        batch: s.batch,
        heads: s.kv_heads * s.group,
        kv_heads: s.kv_heads,
        seq: s.seq,
        keys: past + s.seq,
        capacity,
        hd: s.hd,
        scale: 1.0 / (s.hd as f32).sqrt(),
    })?;
    Ok(Saved {
        q,
        k,
        v,
        probs: None,
    })
}

/// Gradients of q, k, v (heads layout) from that of the context.
pub(crate) fn backward(
    ctx: &Ctx<'_>,
    s: Shape,
    saved: &Saved,
    dcontext: u64,
) -> Result<[DeviceBuffer; 3]> {
    let (rows, t, hd, nb) = (s.rows(), s.seq, s.hd, s.batches());
    let probs = saved
        .probs
        .as_ref()
        .expect("attention over a KV cache is never differentiated");
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
