//! Causal self-attention on heads laid out `[B, heads, T, hd]`, as batched GEMMs around the
//! masked softmax. Grouped-query attention needs no copy of k and v: the `group` query heads
//! that share a key/value head are stacked along the rows, `[B, kv_heads, group * T, hd]`.

use qlora_core::Result;
use qlora_kernels::{DeviceBuffer, Gemm, Precision, SoftmaxArgs};

use super::batch::GpuBatch;
use super::linear::Ctx;

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
    batch: &GpuBatch,
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
        key_mask: batch.key_mask.ptr(),
        slopes: slopes.map_or(0, |b| b.ptr()),
        positions: batch.positions.ptr(),
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

/// Gradients of q, k, v (heads layout) from that of the context.
pub(crate) fn backward(
    ctx: &Ctx<'_>,
    s: Shape,
    saved: &Saved,
    dcontext: u64,
) -> Result<[DeviceBuffer; 3]> {
    let (rows, t, hd, nb) = (s.rows(), s.seq, s.hd, s.batches());
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
        &ctx.gemm(
            t,
            hd,
            rows,
            saved.probs.ptr(),
            true,
            dcontext,
            false,
            dv.ptr(),
        )
        .batched(nb, rows * t, rows * hd, t * hd),
    )?;
    let dscores = ctx.act(s.scores_len(), "attention gradient")?;
    ctx.k.softmax_bwd(
        saved.probs.ptr(),
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
