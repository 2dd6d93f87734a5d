//! A projection `y = x W^T + b + scale * dropout(x) A^T B^T` (PEFT's `lora.Linear`) and its
//! backward pass, which computes the input gradient and accumulates the LoRA gradients (the
//! frozen `W` and `b` get none).

use std::cell::RefCell;
use std::collections::HashMap;

use qlora_core::Result;
use qlora_kernels::{DeviceBuffer, Gemm, Gpu, Kernels, LoraTerm, Precision};

use super::lora::LoraStore;
use super::weights::FrozenWeight;

/// What every layer computation needs: the device, its kernels, the dequantization scratch
/// buffer (sized for the largest projection) and the LoRA parameters.
pub(crate) struct Ctx<'a> {
    pub gpu: &'a Gpu,
    pub k: &'a Kernels,
    pub scratch: &'a DeviceBuffer,
    pub lora: &'a LoraStore,
    /// Dropout is applied (training); `false` in evaluation.
    pub train: bool,
    /// Seeds this micro-batch's dropout masks.
    pub seed: u64,
    /// While set, dequantized weights are kept by projection id: a block recomputed for its
    /// backward pass (gradient checkpointing) then dequantizes each weight once, not twice.
    pub weight_cache: RefCell<Option<HashMap<u64, DeviceBuffer>>>,
}

impl Ctx<'_> {
    /// Keeps dequantized weights from now on (until [`Ctx::end_weight_cache`]).
    pub(crate) fn begin_weight_cache(&self) {
        *self.weight_cache.borrow_mut() = Some(HashMap::new());
    }

    /// Frees the kept weights.
    pub(crate) fn end_weight_cache(&self) {
        *self.weight_cache.borrow_mut() = None;
    }

    pub(crate) fn p(&self) -> Precision {
        self.k.precision
    }

    /// A fresh activation buffer of `n` elements.
    pub(crate) fn act(&self, n: usize, what: &str) -> Result<DeviceBuffer> {
        self.gpu.alloc(self.k.bytes(n), what)
    }

    /// `C [m, n] (+)= A [m, k] . op(B)` in the activation precision.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        a_trans: bool,
        b: u64,
        b_trans: bool,
        c: u64,
    ) -> Gemm {
        Gemm::new(m, n, k, a, a_trans, b, b_trans, c, self.p(), self.p())
    }
}

pub(crate) struct Linear {
    pub weight: FrozenWeight,
    pub bias: Option<DeviceBuffer>,
    /// Slot in the [`LoraStore`], when adapted.
    pub lora: Option<usize>,
    pub in_features: usize,
    pub out_features: usize,
    /// Distinguishes this projection's dropout masks from the others'.
    pub id: u64,
}

/// Where a projection's input gradient goes: `precision` values at `ptr`, overwritten or (with
/// `accumulate`) added to. An f32 target keeps the sum of several projections' gradients (q, k
/// and v; gate and up) from being rounded to bf16 after each one.
#[derive(Clone, Copy)]
pub(crate) struct GradOut {
    pub ptr: u64,
    pub precision: Precision,
    pub accumulate: bool,
}

/// What follows a projection in a block: BLOOM's GELU and/or a residual addition (`y` becomes
/// `gelu(y) + residual`). Fused into the decoding GEMV when the projection has no adapter
/// (an adapter's term must come before them); separate kernels otherwise.
#[derive(Clone, Copy, Default)]
pub(crate) struct Epilogue {
    pub gelu: bool,
    /// `[n, out]` added last.
    pub residual: Option<u64>,
}

impl Epilogue {
    pub(crate) fn residual(residual: u64) -> Epilogue {
        Epilogue {
            gelu: false,
            residual: Some(residual),
        }
    }
}

/// What the backward pass needs from the forward pass besides the input: `dropout(x) A^T`.
pub(crate) struct LinearSaved {
    xa: Option<DeviceBuffer>,
}

impl Linear {
    /// The frozen weight in the activation precision: dequantized into the scratch buffer.
    fn weight_ptr(&self, ctx: &Ctx<'_>) -> Result<u64> {
        match &self.weight {
            FrozenWeight::Dense(d) => Ok(d.ptr()),
            FrozenWeight::Packed(q) => {
                let mut cache = ctx.weight_cache.borrow_mut();
                let Some(kept) = cache.as_mut() else {
                    ctx.k.dequantize(q, ctx.scratch.ptr())?;
                    return Ok(ctx.scratch.ptr());
                };
                if let Some(buf) = kept.get(&self.id) {
                    return Ok(buf.ptr());
                }
                let buf = ctx.act(q.numel, "dequantized weights of one layer")?;
                ctx.k.dequantize(q, buf.ptr())?;
                let ptr = buf.ptr();
                kept.insert(self.id, buf);
                Ok(ptr)
            }
        }
    }

    fn dropout_seed(&self, ctx: &Ctx<'_>) -> u64 {
        ctx.seed ^ self.id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// `dropout(x)` for the LoRA branch: `x` itself when there is no dropout.
    fn dropped(&self, ctx: &Ctx<'_>, x: u64, n: usize, p: f32) -> Result<Option<DeviceBuffer>> {
        if !ctx.train || p <= 0.0 {
            return Ok(None);
        }
        let len = n * self.in_features;
        let out = ctx.act(len, "LoRA dropout")?;
        ctx.k
            .dropout(x, out.ptr(), len, p, self.dropout_seed(ctx))?;
        Ok(Some(out))
    }

    /// `y [n, out] = x [n, in] W^T + b (+ LoRA)`. A few rows (decoding) against a 4-bit weight
    /// take the fused GEMV, which reads the packed weight once and never forms it dense.
    pub(crate) fn forward(&self, ctx: &Ctx<'_>, x: u64, n: usize, y: u64) -> Result<LinearSaved> {
        self.forward_then(ctx, x, n, y, Epilogue::default())
    }

    /// [`Linear::forward`] followed by `epilogue`.
    pub(crate) fn forward_then(
        &self,
        ctx: &Ctx<'_>,
        x: u64,
        n: usize,
        y: u64,
        epilogue: Epilogue,
    ) -> Result<LinearSaved> {
        let (i, o) = (self.in_features, self.out_features);
        let mut pending = Some(epilogue);
        match &self.weight {
            FrozenWeight::Packed(q) if q.gemv_ready() && n <= ctx.k.gemv_max_rows(q, x) => {
                let bias = self.bias.as_ref().map_or(0, |b| b.ptr());
                // Generating, an adapter rides on the GEMV: its first product into xa, its
                // second in the GEMV's epilogue (no backward pass needs xa kept).
                let in_gemv = self
                    .lora
                    .filter(|_| !ctx.train && ctx.k.gemv_takes_lora(q, x));
                // The epilogue rides on the GEMV too, unless an adapter is added after it.
                let fused = if self.lora.is_none() || in_gemv.is_some() {
                    pending.take().unwrap_or_default()
                } else {
                    Epilogue::default()
                };
                let residual = fused.residual.unwrap_or(0);
                match in_gemv {
                    None => ctx.k.gemv_4bit(q, x, bias, residual, fused.gelu, y, n)?,
                    Some(slot) => {
                        let s = &ctx.lora.slots[slot];
                        let xa = ctx.gpu.alloc(4 * n * s.r, "LoRA activations")?;
                        ctx.k.lora_down(x, ctx.lora.a(slot), xa.ptr(), n, s.r, i)?;
                        let term = LoraTerm {
                            xa: xa.ptr(),
                            b: ctx.lora.b(slot),
                            r: s.r,
                            scale: s.scale,
                        };
                        ctx.k
                            .gemv_4bit_lora(q, x, &term, bias, residual, fused.gelu, y, n)?;
                        return Ok(LinearSaved { xa: None });
                    }
                }
            }
            _ => {
                let w = self.weight_ptr(ctx)?;
                ctx.gpu.gemm(&ctx.gemm(n, o, i, x, false, w, true, y))?;
                if let Some(bias) = &self.bias {
                    ctx.k.add_bias(y, bias.ptr(), n, o)?;
                }
            }
        }
        let xa = match self.lora {
            None => None,
            Some(slot) => {
                let s = &ctx.lora.slots[slot];
                let dropped = self.dropped(ctx, x, n, s.dropout)?;
                let xd = dropped.as_ref().map_or(x, |d| d.ptr());
                let xa = ctx.act(n * s.r, "LoRA activations")?;
                ctx.gpu
                    .gemm(&ctx.gemm(n, s.r, i, xd, false, ctx.lora.a(slot), true, xa.ptr()))?;
                ctx.gpu.gemm(
                    &ctx.gemm(n, o, s.r, xa.ptr(), false, ctx.lora.b(slot), true, y)
                        .alpha(s.scale)
                        .accumulate(),
                )?;
                Some(xa)
            }
        };
        if let Some(epilogue) = pending {
            if epilogue.gelu {
                ctx.k.gelu_fwd(y, y, n * o)?;
            }
            if let Some(residual) = epilogue.residual {
                ctx.k.add(y, residual, y, n * o)?;
            }
        }
        Ok(LinearSaved { xa })
    }

    /// Given `dy [n, out]` and the forward input `x`, accumulates the LoRA gradients and, when
    /// `dx` is given, writes (or adds) the input gradient `[n, in]` there.
    pub(crate) fn backward(
        &self,
        ctx: &Ctx<'_>,
        x: u64,
        dy: u64,
        n: usize,
        saved: &LinearSaved,
        dx: Option<GradOut>,
    ) -> Result<()> {
        let (i, o) = (self.in_features, self.out_features);
        if let Some(dx) = dx {
            let w = self.weight_ptr(ctx)?;
            let g = Gemm::new(n, i, o, dy, false, w, false, dx.ptr, ctx.p(), dx.precision);
            ctx.gpu
                .gemm(&if dx.accumulate { g.accumulate() } else { g })?;
        }
        let (Some(slot), Some(xa)) = (self.lora, &saved.xa) else {
            return Ok(());
        };
        let s = &ctx.lora.slots[slot];
        let f32 = Precision::F32;
        // dB [out, r] += scale * dy^T xa
        ctx.gpu.gemm(
            &Gemm::new(
                o,
                s.r,
                n,
                dy,
                true,
                xa.ptr(),
                false,
                ctx.lora.grad_b(slot),
                ctx.p(),
                f32,
            )
            .alpha(s.scale)
            .accumulate(),
        )?;
        // dxa [n, r] = scale * dy B
        let dxa = ctx.act(n * s.r, "LoRA gradient")?;
        ctx.gpu.gemm(
            &ctx.gemm(n, s.r, o, dy, false, ctx.lora.b(slot), false, dxa.ptr())
                .alpha(s.scale),
        )?;
        // dA [r, in] += dxa^T dropout(x)
        let dropped = self.dropped(ctx, x, n, s.dropout)?;
        let xd = dropped.as_ref().map_or(x, |d| d.ptr());
        ctx.gpu.gemm(
            &Gemm::new(
                s.r,
                i,
                n,
                dxa.ptr(),
                true,
                xd,
                false,
                ctx.lora.grad_a(slot),
                ctx.p(),
                f32,
            )
            .accumulate(),
        )?;
        // dx += dropout'(dxa A) (dx already holds dy W).
        if let Some(dx) = dx {
            match dropped {
                None => {
                    let g = Gemm::new(
                        n,
                        i,
                        s.r,
                        dxa.ptr(),
                        false,
                        ctx.lora.a(slot),
                        false,
                        dx.ptr,
                        ctx.p(),
                        dx.precision,
                    );
                    ctx.gpu.gemm(&g.accumulate())?;
                }
                Some(buf) => {
                    // Reuses the dropped-input buffer for dxa A, then applies the same mask.
                    ctx.gpu.gemm(&ctx.gemm(
                        n,
                        i,
                        s.r,
                        dxa.ptr(),
                        false,
                        ctx.lora.a(slot),
                        false,
                        buf.ptr(),
                    ))?;
                    ctx.k.dropout(
                        buf.ptr(),
                        buf.ptr(),
                        n * i,
                        s.dropout,
                        self.dropout_seed(ctx),
                    )?;
                    if dx.precision == ctx.p() {
                        ctx.k.add(dx.ptr, buf.ptr(), dx.ptr, n * i)?;
                    } else {
                        ctx.k.add_into_f32(dx.ptr, buf.ptr(), n * i)?;
                    }
                }
            }
        }
        Ok(())
    }
}
