//! The LM head fused with the cross-entropy: logits are made, turned into their gradient and
//! multiplied back into the hidden state's gradient one chunk of tokens at a time, so the full
//! `[tokens, vocab]` logits never exist. Only the rows that predict a label go through the head
//! (gathered into a compact block): the others add nothing to the loss and get a zero gradient.

use qlora_core::Result;
use qlora_kernels::{Gemm, Precision};

use super::batch::GpuBatch;
use super::linear::Ctx;

/// f32 logits per chunk at most (the gradient chunk adds half or as much again). Large enough
/// that the chunk's `dL/dlogits . table` product, whose output is only `[rows, H]`, has enough
/// output tiles to fill the GPU.
const CHUNK_BYTES: usize = 1 << 30;

/// Rows per chunk: a multiple of 128 (the GEMM tile height) when more than that fit.
fn chunk_rows(tokens: usize, vocab: usize) -> usize {
    let fit = CHUNK_BYTES / (4 * vocab);
    let rows = if fit >= 128 {
        fit / 128 * 128
    } else {
        fit.max(1)
    };
    rows.min(tokens)
}

/// Mean next-token loss of `hidden [N, H]` (after the final norm) against the batch's targets,
/// with `dL/d hidden` written to `dhidden` scaled by `grad_scale` (1 / micro-batches).
/// `table [V, H]` is the head (or the tied embedding).
#[allow(clippy::too_many_arguments)]
pub(crate) fn loss_and_grad(
    ctx: &Ctx<'_>,
    hidden: u64,
    table: u64,
    vocab: usize,
    dim: usize,
    batch: &GpuBatch,
    dhidden: Option<u64>,
    grad_scale: f32,
) -> Result<f64> {
    // Rows through the head: the labeled ones.
    let n = batch.count;
    let t = ctx.p().size();
    let labeled = ctx.act(n * dim, "labeled hidden states")?;
    ctx.k
        .embedding(batch.labeled_rows.ptr(), hidden, labeled.ptr(), n, dim)?;
    let dlabeled = dhidden
        .map(|_| ctx.act(n * dim, "labeled hidden-state gradient"))
        .transpose()?;
    let chunk = chunk_rows(n, vocab);
    let logits = ctx
        .gpu
        .alloc(4 * chunk * vocab, "LM-head logits (one chunk)")?;
    let dlogits = ctx.act(chunk * vocab, "LM-head gradient (one chunk)")?;
    let losses = ctx.gpu.alloc(4 * n, "per-token loss")?;
    let inv_count = grad_scale / batch.count as f32;
    for start in (0..n).step_by(chunk) {
        let rows = chunk.min(n - start);
        let h = labeled.ptr() + (start * dim * t) as u64;
        ctx.gpu.gemm(&Gemm::new(
            rows,
            vocab,
            dim,
            h,
            false,
            table,
            true,
            logits.ptr(),
            ctx.p(),
            Precision::F32,
        ))?;
        ctx.k.cross_entropy(
            logits.ptr(),
            batch.targets.ptr() + (4 * start) as u64,
            batch.weights.ptr() + (4 * start) as u64,
            losses.ptr() + (4 * start) as u64,
            dlogits.ptr(),
            rows,
            vocab,
            inv_count,
        )?;
        if let Some(dl) = &dlabeled {
            let dh = dl.ptr() + (start * dim * t) as u64;
            ctx.gpu
                .gemm(&ctx.gemm(rows, dim, vocab, dlogits.ptr(), false, table, false, dh))?;
        }
    }
    if let (Some(dh), Some(dl)) = (dhidden, &dlabeled) {
        ctx.gpu.memset_zero(dh, batch.tokens() * dim * t)?;
        ctx.k
            .scatter_rows(batch.labeled_rows.ptr(), dl.ptr(), dh, n, dim)?;
    }
    let per_token = ctx.gpu.read::<f32>(losses.ptr(), n)?;
    Ok(per_token.iter().map(|&l| f64::from(l)).sum::<f64>() / batch.count as f64)
}

#[cfg(test)]
mod tests {
    use super::chunk_rows;

    #[test]
    fn chunks_are_whole_tiles_and_never_exceed_the_tokens() {
        assert_eq!(chunk_rows(2048, 250_880), 1024);
        assert_eq!(chunk_rows(512, 250_880), 512);
        assert_eq!(chunk_rows(10, 512), 10);
        // A vocabulary too large for one tile of rows still makes progress.
        assert_eq!(chunk_rows(100, 1 << 30), 1);
    }
}
