//! Host wrappers of the CUDA C kernels (`kernels/cuda/*.cu`): one method per kernel, taking
//! device addresses and explicit sizes. Tensors of the activation type `T` are f32 or bf16 as
//! the [`Precision`] these kernels were compiled for.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdevice_attribute};
use cudarc::driver::{CudaFunction, CudaStream, DriverError, LaunchConfig};
use qlora_core::quant::{decode_table, dynamic_map_signed, Absmax, Quantized4};
use qlora_core::Result;

use crate::buffer::DeviceBuffer;
use crate::compile::compile;
use crate::device::Gpu;
use crate::{error, Precision};

const SOURCES: [&str; 8] = [
    include_str!("../cuda/common.cuh"),
    include_str!("../cuda/dequant.cu"),
    include_str!("../cuda/elementwise.cu"),
    include_str!("../cuda/norm.cu"),
    include_str!("../cuda/attention.cu"),
    include_str!("../cuda/loss.cu"),
    include_str!("../cuda/adamw.cu"),
    include_str!("../cuda/decode.cu"),
];

/// The whole CUDA C source, as NVRTC compiles it (with `QLORA_T` defined).
pub(crate) fn source() -> String {
    SOURCES.concat()
}

pub(crate) const NAMES: [&str; 47] = [
    "dequant_4bit",
    "cast_f32_to_t",
    "cast_t_to_f32",
    "add",
    "add_bias",
    "scale_f32",
    "sum_squares_f32",
    "gelu_fwd",
    "gelu_bwd",
    "swiglu_fwd",
    "swiglu_bwd",
    "dropout",
    "embedding_fwd",
    "scatter_rows",
    "layernorm_fwd",
    "layernorm_bwd",
    "rmsnorm_fwd",
    "rmsnorm_bwd",
    "heads_from_tokens",
    "tokens_from_heads",
    "rope",
    "softmax_fwd",
    "softmax_bwd",
    "cross_entropy_fwd_bwd",
    "adamw",
    "add_into_f32",
    "dequant_4bit_x8",
    "gemv_4bit_1",
    "gemv_4bit_2",
    "gemv_4bit_4",
    "gemv_4bit_wide_1",
    "gemv_4bit_wide_2",
    "gemv_4bit_wide_4",
    "gemv_4bit_tc",
    "gemv_4bit_tc_dq",
    "gemv_4bit_tc_lora",
    "gemv_4bit_tc_dq_lora",
    "lora_down",
    "absmax_q8_by_step",
    "gemv_dense",
    "kv_append",
    "attention_cached",
    "attention_combine",
    "repetition_penalty",
    "argmax_slices",
    "argmax_pairs",
    "top_k_candidates",
];

/// Token rows the CUDA-core GEMVs (f32, or without tensor cores) serve at most.
const GEMV_MAX_ROWS: usize = 4;

/// Token rows one pass of the tensor-core GEMV serves (its mma's N).
const GEMV_TC_ROWS: usize = 8;

/// Token rows the tensor-core GEMV serves at most, a pass per [`GEMV_TC_ROWS`]: four passes read
/// the packed weight four times (2 bytes a weight in all), still less than half of what
/// dequantizing it for a GEMM moves (write and read it in bf16: 4.5 bytes a weight).
const GEMV_TC_MAX_ROWS: usize = 4 * GEMV_TC_ROWS;

/// Token rows [`Kernels::gemv_dense`] serves at most (`GEMV_DENSE_ROWS` in decode.cu).
const GEMV_DENSE_ROWS: usize = 4;

/// Threads of a [`Kernels::gemv_dense`] block: eight warps, one output feature each at a time.
const GEMV_DENSE_THREADS: u32 = 256;

/// A LoRA adapter's term that [`Kernels::gemv_4bit_lora`] adds in its epilogue:
/// `scale * xa B^T`, `xa [rows, r]` f32 from [`Kernels::lora_down`], `b` the adapter's
/// `B [out, r]` in the activation precision.
#[derive(Debug, Clone, Copy)]
pub struct LoraTerm {
    pub xa: u64,
    pub b: u64,
    pub r: usize,
    pub scale: f32,
}

/// `GemvLora` of decode.cu, the last parameter (by value) of the tensor-core GEMVs' `_lora`
/// kernels.
#[repr(C)]
struct LoraTermArg {
    xa: u64,
    b: u64,
    r: i32,
    scale: f32,
}

impl From<&LoraTerm> for LoraTermArg {
    fn from(t: &LoraTerm) -> LoraTermArg {
        LoraTermArg {
            xa: t.xa,
            b: t.b,
            r: t.r as i32,
            scale: t.scale,
        }
    }
}

/// The compiled kernels for one activation precision.
pub struct Kernels {
    pub precision: Precision,
    stream: Arc<CudaStream>,
    functions: Vec<CudaFunction>,
    /// The [`GemvKernel`] chosen (see [`Kernels::set_gemv`]), as its index.
    gemv: AtomicU8,
    /// Whether the device has bf16 tensor cores (sm_80 and newer) for [`GemvKernel::Tensor`].
    tensor_cores: bool,
    /// Whether kernels launch early (programmatic dependent launch, sm_90 and newer): see
    /// `wait_for_prior_grids` in common.cuh, which every kernel calls before it reads or writes
    /// what another kernel touches.
    early_launch: bool,
    /// Blocks of one full wave of each `gemv_4bit_wide_R` (R = 1, 2, 4), of `gemv_4bit_tc`
    /// (`_dq` and `_lora` alike) and of `gemv_dense`: the SMs times the blocks an SM holds at
    /// that kernel's registers and shared memory.
    gemv_wave: [u32; 5],
}

/// The fused 4-bit GEMVs of decoding. `OneChunk` and `Wide` compute the same sums in the same
/// order (the same bits), in f32 from exact f32 weights: `OneChunk` keeps one 16-byte chunk of
/// codes in flight per lane; `Wide` walks several rows per warp with the next group of codes and
/// absmax in flight, with fewer instructions per code (weights with power-of-two block sizes and
/// fewer than 2^31 elements, x 16-byte aligned; others take `OneChunk`). `Tensor` is for bf16
/// activations on sm_80 and newer: weights dequantized to bf16 as bitsandbytes' batch-1 kernel
/// does, products summed in f32 on tensor cores, up to 8 token rows per pass (input widths that
/// are multiples of 128, `Wide`'s other conditions; others take `Wide`). `qlora bench generate`
/// times the chosen one against another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemvKernel {
    OneChunk,
    Wide,
    #[default]
    Tensor,
}

impl GemvKernel {
    const ALL: [GemvKernel; 3] = [GemvKernel::OneChunk, GemvKernel::Wide, GemvKernel::Tensor];

    /// Token rows one [`Kernels::gemv_4bit`] call with this kernel serves at most.
    fn max_rows(self) -> usize {
        match self {
            GemvKernel::Tensor => GEMV_TC_MAX_ROWS,
            _ => GEMV_MAX_ROWS,
        }
    }
}

fn grid(n: usize, block: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(block).max(1) as u32, 1, 1),
        block_dim: (block as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks of a grid-stride kernel at most: enough to fill every SM of an H100 (132 SMs of 8
/// resident 256-thread blocks) twice over.
const MAX_STRIDE_BLOCKS: usize = 2048;

/// Threads of a CUDA-core GEMV block: eight warps, one output feature per warp at a time.
const GEMV_THREADS: u32 = 256;

/// Threads of a `lora_down` block (one per adapter rank and token row).
const LORA_DOWN_THREADS: u32 = 256;

/// Threads of a tensor-core GEMV block (`GEMV_TC_WARPS` in decode.cu): sixteen warps on a tile
/// of 16 features.
const GEMV_TC_THREADS: u32 = 512;

/// The persistent GEMVs whose grid is one wave, with their block's threads: the wide ones by
/// rows served (1, 2, 4), the tensor-core one, then the dense one.
const GEMV_WAVE: [(&str, u32); 5] = [
    ("gemv_4bit_wide_1", GEMV_THREADS),
    ("gemv_4bit_wide_2", GEMV_THREADS),
    ("gemv_4bit_wide_4", GEMV_THREADS),
    ("gemv_4bit_tc", GEMV_TC_THREADS),
    ("gemv_dense", GEMV_DENSE_THREADS),
];

/// One thread per item of `n`, capped at [`MAX_STRIDE_BLOCKS`] (the kernel strides over the rest).
fn bounded_grid(n: usize, block: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(block).clamp(1, MAX_STRIDE_BLOCKS) as u32, 1, 1),
        ..grid(n, block)
    }
}

/// Packs of [`PACK`] values each thread of a norm's forward kernel keeps (`NORM_PACKS` in
/// norm.cu).
const NORM_PACKS: usize = 2;

/// Threads per block of the norms' forward kernels: one pack of the row each, at most 1024
/// (then up to [`NORM_PACKS`] each).
fn norm_block(dim: usize) -> Result<usize> {
    let threads = row_block(dim.div_ceil(PACK)).min(1024);
    if dim > threads * PACK * NORM_PACKS {
        return Err(error(format!(
            "normalizing rows of {dim} values: at most {} are supported",
            1024 * PACK * NORM_PACKS
        )));
    }
    Ok(threads)
}

/// Slices of a row [`Kernels::argmax_rows`] reduces in parallel: one per 2,048 logits, at most
/// 256 (a 250k vocabulary in 123 blocks).
fn argmax_slices(vocab: usize) -> usize {
    vocab.div_ceil(2048).clamp(1, 256)
}

/// Shared memory a block of [`Kernels::attention_cached`] may use (the default without opting in).
const ATTENTION_SHARED_BYTES: usize = 48 * 1024;

/// Blocks [`Kernels::attention_cached`] aims for (about two per SM of an H100): a decoding step's
/// few query rows split their keys until there are this many.
const ATTENTION_BLOCKS: usize = 256;

/// Keys a split of [`Kernels::attention_cached`] takes at least.
const MIN_KEYS_PER_SPLIT: usize = 32;

/// Threads of a block of [`Kernels::attention_cached`].
const ATTENTION_THREADS: usize = 128;

/// Floats of shared memory a block of [`Kernels::attention_cached`] needs besides its split's
/// scores: the query and each key group's weighted values (a group is a pack of columns per
/// thread across the head, `groups` in decode.cu).
fn attention_fixed_floats(hd: usize) -> usize {
    let groups = (ATTENTION_THREADS / hd.div_ceil(PACK)).max(1);
    hd + groups * hd
}

/// Values per thread of the packed element-wise kernels (`PACK` in common.cuh).
const PACK: usize = 8;

/// One thread per pack of [`PACK`] values of `n`.
fn packs(n: usize) -> LaunchConfig {
    grid(n.div_ceil(PACK), 256)
}

fn rows(n: usize, block: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (block as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per block for a per-row kernel over rows of `dim`.
fn row_block(dim: usize) -> usize {
    dim.div_ceil(32).clamp(1, 32) * 32
}

macro_rules! launch {
    ($self:ident, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        launch!($self, $name, $cfg, $($arg),* ; None::<()>)
    }};
    // `$last`: an Option of one more argument, passed only when Some.
    ($self:ident, $name:expr, $cfg:expr, $($arg:expr),* ; $last:expr) => {{
        let mut args: Vec<*mut std::ffi::c_void> = Vec::new();
        // Each argument is bound first: the launch reads them through these pointers.
        $( let arg = $arg; args.push(&arg as *const _ as *mut std::ffi::c_void); )*
        let last = $last;
        if let Some(last) = &last {
            args.push(last as *const _ as *mut std::ffi::c_void);
        }
        // SAFETY: the arguments match the kernel's signature in kernels/cuda (checked by the
        // kernel tests), and the callers pass device ranges of the sizes they describe.
        unsafe { $self.launch_with($name, $cfg, &mut args) }
    }};
}

/// Arguments of [`Kernels::softmax_fwd`].
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxArgs {
    /// `[batch, kv_heads, group * seq, keys]` f32.
    pub scores: u64,
    /// Same shape, `T`.
    pub probs: u64,
    /// `[batch, keys]` f32: 1 real key, 0 padding.
    pub key_mask: u64,
    /// `[kv_heads * group]` f32 ALiBi slopes, or 0 for none.
    pub slopes: u64,
    /// `[batch, keys]` f32 ALiBi positions (ignored without slopes).
    pub positions: u64,
    pub batch: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub seq: usize,
    pub keys: usize,
    pub scale: f32,
}

impl Kernels {
    pub(crate) fn load(gpu: &Gpu, precision: Precision) -> Result<Kernels> {
        let ptx = compile(
            &source(),
            gpu.inner.arch,
            &[format!("QLORA_T={}", precision.c_type())],
        )?;
        let module = gpu
            .inner
            .ctx
            .load_module(ptx)
            .map_err(|e| error(format!("CUDA: loading the compiled kernels failed: {e:?}")))?;
        let functions = NAMES
            .iter()
            .map(|n| {
                module
                    .load_function(n)
                    .map_err(|e| error(format!("CUDA: kernel {n} not found in the module: {e:?}")))
            })
            .collect::<Result<Vec<CudaFunction>>>()?;
        let sms = gpu
            .inner
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| error(format!("CUDA: reading the SM count failed: {e:?}")))?;
        let mut gemv_wave = [0u32; 5];
        for (wave, (name, threads)) in gemv_wave.iter_mut().zip(GEMV_WAVE) {
            let i = NAMES
                .iter()
                .position(|n| *n == name)
                .expect("a persistent GEMV name");
            let per_sm = functions[i]
                .occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)
                .map_err(|e| error(format!("CUDA: occupancy of {name} failed: {e:?}")))?;
            *wave = (sms.max(1) as u32) * per_sm.max(1);
        }
        Ok(Kernels {
            precision,
            stream: gpu.inner.stream.clone(),
            functions,
            gemv: AtomicU8::new(GemvKernel::default() as u8),
            tensor_cores: gpu.inner.arch >= 80,
            early_launch: gpu.inner.arch >= 90,
            gemv_wave,
        })
    }

    /// Which GEMV [`Kernels::gemv_4bit`] launches from now on.
    pub fn set_gemv(&self, kernel: GemvKernel) {
        self.gemv.store(kernel as u8, Ordering::Relaxed);
    }

    /// Token rows up to which [`Kernels::gemv_4bit`] multiplies `x` (at device address `x`)
    /// by the 4-bit `w`; more rows are cheaper through a dequantized copy and a GEMM.
    pub fn gemv_max_rows(&self, w: &DeviceQuantized, x: u64) -> usize {
        self.gemv_for(w, x).max_rows()
    }

    /// The GEMV that serves `w` against x at device address `x`: the chosen one, or the next
    /// one that can (`Tensor` -> `Wide` -> `OneChunk`).
    fn gemv_for(&self, w: &DeviceQuantized, x: u64) -> GemvKernel {
        let chosen = GemvKernel::ALL[self.gemv.load(Ordering::Relaxed) as usize];
        // Both read x in 16-byte loads without testing each.
        let wide = w.wide_gemv_ready() && x.is_multiple_of(16);
        let tensor = wide
            && self.tensor_gemv_shape(w)
            && (w.absmax_args().quantized == 0 || w.q8_by_step.is_some());
        match chosen {
            GemvKernel::Tensor if tensor => GemvKernel::Tensor,
            GemvKernel::Tensor | GemvKernel::Wide if wide => GemvKernel::Wide,
            _ => GemvKernel::OneChunk,
        }
    }

    /// Launches kernel `name` with `args` (pointers to each argument's value) on this stream;
    /// on sm_90 and newer it may start before the kernel ahead of it finishes (see
    /// `early_launch`).
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and types and describe valid device
    /// ranges.
    unsafe fn launch_with(
        &self,
        name: &str,
        cfg: LaunchConfig,
        args: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        let failed = |e: DriverError| error(format!("CUDA: launching {name} failed: {e:?}"));
        self.stream.context().bind_to_thread().map_err(failed)?;
        let mut early = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue {
                programmaticStreamSerializationAllowed: 1,
            },
        };
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if self.early_launch {
                &mut early
            } else {
                std::ptr::null_mut()
            },
            numAttrs: u32::from(self.early_launch),
        };
        // SAFETY: `config` and `early` outlive the call; the caller vouches for `args`.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.function(name).cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(failed)
    }

    fn function(&self, name: &str) -> &CudaFunction {
        let i = NAMES
            .iter()
            .position(|n| *n == name)
            .expect("kernel name listed in NAMES");
        &self.functions[i]
    }

    fn t(&self) -> usize {
        self.precision.size()
    }

    /// `out[i] = x[i]` f32 -> T.
    pub fn cast_from_f32(&self, x: u64, out: u64, n: usize) -> Result<()> {
        launch!(self, "cast_f32_to_t", grid(n, 256), x, out, n as i64)
    }

    /// `out[i] = x[i]` T -> f32.
    pub fn cast_to_f32(&self, x: u64, out: u64, n: usize) -> Result<()> {
        launch!(self, "cast_t_to_f32", grid(n, 256), x, out, n as i64)
    }

    /// `out = a + b` (T; out may alias a or b).
    pub fn add(&self, a: u64, b: u64, out: u64, n: usize) -> Result<()> {
        launch!(self, "add", packs(n), a, b, out, n as i64)
    }

    /// `acc (f32) += x (T)`.
    pub fn add_into_f32(&self, acc: u64, x: u64, n: usize) -> Result<()> {
        launch!(self, "add_into_f32", packs(n), acc, x, n as i64)
    }

    /// `out[r, :] += bias` for `rows` rows of `cols` (T).
    pub fn add_bias(&self, out: u64, bias: u64, rows: usize, cols: usize) -> Result<()> {
        launch!(
            self,
            "add_bias",
            packs(rows * cols),
            out,
            bias,
            rows as i64,
            cols as i32
        )
    }

    /// `x *= factor` (f32).
    pub fn scale_f32(&self, x: u64, factor: f32, n: usize) -> Result<()> {
        launch!(self, "scale_f32", grid(n, 256), x, factor, n as i64)
    }

    /// `*total (f64) += sum(x^2)` (x f32).
    pub fn sum_squares(&self, x: u64, n: usize, total: u64) -> Result<()> {
        launch!(self, "sum_squares_f32", grid(n, 256), x, n as i64, total)
    }

    pub fn gelu_fwd(&self, x: u64, out: u64, n: usize) -> Result<()> {
        launch!(self, "gelu_fwd", packs(n), x, out, n as i64)
    }

    /// `dx = gelu'(x) * dy` (dx may alias dy).
    pub fn gelu_bwd(&self, x: u64, dy: u64, dx: u64, n: usize) -> Result<()> {
        launch!(self, "gelu_bwd", packs(n), x, dy, dx, n as i64)
    }

    /// `out = silu(gate) * up`.
    pub fn swiglu_fwd(&self, gate: u64, up: u64, out: u64, n: usize) -> Result<()> {
        launch!(self, "swiglu_fwd", grid(n, 256), gate, up, out, n as i64)
    }

    pub fn swiglu_bwd(
        &self,
        gate: u64,
        up: u64,
        dy: u64,
        dgate: u64,
        dup: u64,
        n: usize,
    ) -> Result<()> {
        launch!(
            self,
            "swiglu_bwd",
            grid(n, 256),
            gate,
            up,
            dy,
            dgate,
            dup,
            n as i64
        )
    }

    /// Inverted dropout with the mask of `seed` (the same call on a gradient is its backward).
    pub fn dropout(&self, x: u64, out: u64, n: usize, p: f32, seed: u64) -> Result<()> {
        launch!(self, "dropout", packs(n), x, out, n as i64, p, seed)
    }

    /// `out [n, hidden] = table[ids]` (ids u32).
    pub fn embedding(&self, ids: u64, table: u64, out: u64, n: usize, hidden: usize) -> Result<()> {
        launch!(
            self,
            "embedding_fwd",
            rows(n, row_block(hidden).min(256)),
            ids,
            table,
            out,
            hidden as i32
        )
    }

    /// `out[ids[i]] = src [n, hidden][i]` (ids u32, distinct): rows back to where
    /// [`Kernels::embedding`] gathered them from.
    pub fn scatter_rows(
        &self,
        ids: u64,
        src: u64,
        out: u64,
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        launch!(
            self,
            "scatter_rows",
            rows(n, row_block(hidden).min(256)),
            ids,
            src,
            out,
            hidden as i32
        )
    }

    /// LayerNorm of `n` rows of `dim`; `bias` may be 0. Saves mean and rstd (f32 `[n]`).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_fwd(
        &self,
        x: u64,
        w: u64,
        bias: u64,
        out: u64,
        mean: u64,
        rstd: u64,
        n: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        launch!(
            self,
            "layernorm_fwd",
            rows(n, norm_block(dim)?),
            x,
            w,
            bias,
            out,
            mean,
            rstd,
            dim as i32,
            eps
        )
    }

    /// Input gradient of LayerNorm; adds into `dx` when `accumulate`.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_bwd(
        &self,
        dy: u64,
        x: u64,
        w: u64,
        mean: u64,
        rstd: u64,
        dx: u64,
        n: usize,
        dim: usize,
        accumulate: bool,
    ) -> Result<()> {
        launch!(
            self,
            "layernorm_bwd",
            rows(n, row_block(dim).min(1024)),
            dy,
            x,
            w,
            mean,
            rstd,
            dx,
            dim as i32,
            accumulate as i32
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_fwd(
        &self,
        x: u64,
        w: u64,
        out: u64,
        rstd: u64,
        n: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        launch!(
            self,
            "rmsnorm_fwd",
            rows(n, norm_block(dim)?),
            x,
            w,
            out,
            rstd,
            dim as i32,
            eps
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd(
        &self,
        dy: u64,
        x: u64,
        w: u64,
        rstd: u64,
        dx: u64,
        n: usize,
        dim: usize,
        accumulate: bool,
    ) -> Result<()> {
        launch!(
            self,
            "rmsnorm_bwd",
            rows(n, row_block(dim).min(1024)),
            dy,
            x,
            w,
            rstd,
            dx,
            dim as i32,
            accumulate as i32
        )
    }

    /// Slot `group` of `src [B, T, heads, groups, hd]` -> `dst [B, heads, T, hd]`.
    #[allow(clippy::too_many_arguments)]
    pub fn heads_from_tokens(
        &self,
        src: u64,
        dst: u64,
        batch: usize,
        seq: usize,
        heads: usize,
        groups: usize,
        group: usize,
        hd: usize,
    ) -> Result<()> {
        self.head_layout(
            "heads_from_tokens",
            src,
            dst,
            [batch, seq, heads, groups, group, hd],
        )
    }

    /// `src [B, heads, T, hd]` -> slot `group` of `dst [B, T, heads, groups, hd]`.
    #[allow(clippy::too_many_arguments)]
    pub fn tokens_from_heads(
        &self,
        src: u64,
        dst: u64,
        batch: usize,
        seq: usize,
        heads: usize,
        groups: usize,
        group: usize,
        hd: usize,
    ) -> Result<()> {
        self.head_layout(
            "tokens_from_heads",
            src,
            dst,
            [batch, seq, heads, groups, group, hd],
        )
    }

    /// One of the two head-layout kernels, which take the same arguments.
    fn head_layout(&self, kernel: &str, src: u64, dst: u64, dims: [usize; 6]) -> Result<()> {
        let [batch, seq, heads, groups, group, hd] = dims;
        let n = batch * seq * heads * hd;
        launch!(
            self,
            kernel,
            packs(n),
            src,
            dst,
            batch as i32,
            seq as i32,
            heads as i32,
            groups as i32,
            group as i32,
            hd as i32
        )
    }

    /// RoPE in place on `x [B, heads, T, hd]` (`rows = B * heads * T`) with f32 tables
    /// `[B, T, hd]` (each row's own positions); `inverse` rotates back (the backward pass).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: u64,
        cos: u64,
        sin: u64,
        rows_: usize,
        heads: usize,
        seq: usize,
        hd: usize,
        half_split: bool,
        inverse: bool,
    ) -> Result<()> {
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        launch!(
            self,
            "rope",
            grid(rows_ * hd / 2, 256),
            x,
            cos,
            sin,
            rows_ as i64,
            heads as i32,
            seq as i32,
            hd as i32,
            half_split as i32,
            sign
        )
    }

    pub fn softmax_fwd(&self, a: &SoftmaxArgs) -> Result<()> {
        let n = a.batch * a.kv_heads * a.group * a.seq;
        launch!(
            self,
            "softmax_fwd",
            grid(n * 32, 256),
            a.scores,
            a.probs,
            a.key_mask,
            a.slopes,
            a.positions,
            n as i64,
            a.kv_heads as i32,
            a.group as i32,
            a.seq as i32,
            a.keys as i32,
            a.scale
        )
    }

    /// `dscores = scale * p * (dp - sum(p dp))` over `rows` rows of `keys`.
    pub fn softmax_bwd(
        &self,
        probs: u64,
        dprobs: u64,
        dscores: u64,
        rows_: usize,
        keys: usize,
        scale: f32,
    ) -> Result<()> {
        launch!(
            self,
            "softmax_bwd",
            grid(rows_ * 32, 256),
            probs,
            dprobs,
            dscores,
            rows_ as i64,
            keys as i32,
            scale
        )
    }

    /// Per-row loss (f32 `[n]`) and logit gradient (T `[n, vocab]`) of f32 logits `[n, vocab]`.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy(
        &self,
        logits: u64,
        targets: u64,
        weights: u64,
        loss: u64,
        grad: u64,
        n: usize,
        vocab: usize,
        inv_count: f32,
    ) -> Result<()> {
        launch!(
            self,
            "cross_entropy_fwd_bwd",
            rows(n, 1024),
            logits,
            targets,
            weights,
            loss,
            grad,
            vocab as i32,
            inv_count
        )
    }

    /// One AdamW update of `n` f32 parameters (and their T copy `param_t`).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        param: u64,
        grad: u64,
        m: u64,
        v: u64,
        param_t: u64,
        n: usize,
        c: &AdamWCoefficients,
    ) -> Result<()> {
        launch!(
            self,
            "adamw",
            grid(n, 256),
            param,
            grad,
            m,
            v,
            param_t,
            n as i64,
            c.decay,
            c.one_minus_beta1,
            c.beta2,
            c.one_minus_beta2,
            c.step_size,
            c.bias_correction2_sqrt,
            c.eps
        )
    }

    /// Dequantizes `w` into `out` (T, `w.numel` values).
    pub fn dequantize(&self, w: &DeviceQuantized, out: u64) -> Result<()> {
        let a = w.absmax_args();
        if w.numel.is_multiple_of(8) && w.block_sizes_are_powers_of_two() {
            let groups = w.numel / 8;
            let (nested_shift, block_shift) = w.block_shifts();
            return launch!(
                self,
                "dequant_4bit_x8",
                bounded_grid(groups, 256),
                w.packed.ptr(),
                a.absmax,
                a.quantized,
                a.code,
                a.nested_absmax,
                a.offset,
                nested_shift,
                w.code.ptr(),
                out,
                groups as i64,
                block_shift
            );
        }
        let bytes = w.numel.div_ceil(2);
        launch!(
            self,
            "dequant_4bit",
            grid(bytes, 256),
            w.packed.ptr(),
            a.absmax,
            a.quantized,
            a.code,
            a.nested_absmax,
            a.offset,
            a.nested_blocksize,
            w.code.ptr(),
            out,
            w.numel as i64,
            w.blocksize as i32
        )
    }

    /// Whether this card and precision run the tensor-core GEMV on `w`'s shape (a
    /// double-quantized `w` also needs [`Kernels::prepare_gemv`]).
    fn tensor_gemv_shape(&self, w: &DeviceQuantized) -> bool {
        w.wide_gemv_ready()
            && self.tensor_cores
            && self.precision == Precision::Bf16
            && w.shape[1].is_multiple_of(128)
    }

    /// Readies `w` for the tensor-core GEMV where it is double-quantized: a copy of its 8-bit
    /// absmax codes in the order the kernel reads them (`absmax_q8_by_step` in decode.cu; 1 byte
    /// per 64 weights, so 1.6% more device memory). Decoding calls this once after loading;
    /// training does not, and keeps the memory. Weights it cannot serve (block sizes under 64)
    /// are left as they are and take the wide GEMV.
    pub fn prepare_gemv(&self, gpu: &Gpu, w: &mut DeviceQuantized) -> Result<()> {
        let DeviceAbsmax::Double { quantized, .. } = &w.absmax else {
            return Ok(());
        };
        if w.q8_by_step.is_some() || w.blocksize < 64 || !self.tensor_gemv_shape(w) {
            return Ok(());
        }
        let [out_features, in_features] = w.shape[..] else {
            return Ok(());
        };
        let bytes = out_features.div_ceil(16) * (in_features / 128) * 32;
        let by_step = gpu.alloc(bytes, "absmax codes in GEMV step order")?;
        let (_, block_shift) = w.block_shifts();
        launch!(
            self,
            "absmax_q8_by_step",
            grid(bytes, 256),
            quantized.ptr(),
            by_step.ptr(),
            out_features as i32,
            in_features as i32,
            block_shift
        )?;
        w.q8_by_step = Some(by_step);
        Ok(())
    }

    /// `y [rows, out] = act(x [rows, in] W^T + bias) + residual` straight from the packed 4-bit
    /// weight `W [out, in]` (`bias`, `residual`: 0 for none; `gelu`: BLOOM's GELU as the
    /// activation, else none), for `rows <= gemv_max_rows(w, x)` and a weight
    /// [`DeviceQuantized::gemv_ready`]: read once, or once a pass of the tensor-core kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_4bit(
        &self,
        w: &DeviceQuantized,
        x: u64,
        bias: u64,
        residual: u64,
        gelu: bool,
        y: u64,
        rows_: usize,
    ) -> Result<()> {
        self.gemv(w, x, None, bias, residual, gelu, y, rows_)
    }

    /// Whether [`Kernels::gemv_4bit_lora`] serves `w` against x at device address `x`: the
    /// tensor-core GEMV's epilogue adds the adapter's term.
    pub fn gemv_takes_lora(&self, w: &DeviceQuantized, x: u64) -> bool {
        w.gemv_ready() && self.gemv_for(w, x) == GemvKernel::Tensor
    }

    /// `xa [rows, r] = x [rows, in] A^T` in f32 for `A [r, in]` (activation precision): a LoRA
    /// branch's first product for [`Kernels::gemv_4bit_lora`].
    pub fn lora_down(
        &self,
        x: u64,
        a: u64,
        xa: u64,
        rows: usize,
        r: usize,
        in_features: usize,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (r as u32, rows as u32, 1),
            block_dim: (LORA_DOWN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "lora_down",
            cfg,
            x,
            a,
            xa,
            r as i32,
            in_features as i32
        )
    }

    /// [`Kernels::gemv_4bit`] with a LoRA adapter's term added before the activation and
    /// residual, where [`Kernels::gemv_takes_lora`].
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_4bit_lora(
        &self,
        w: &DeviceQuantized,
        x: u64,
        lora: &LoraTerm,
        bias: u64,
        residual: u64,
        gelu: bool,
        y: u64,
        rows: usize,
    ) -> Result<()> {
        if !self.gemv_takes_lora(w, x) {
            return Err(error(format!(
                "gemv_4bit_lora: a {:?} weight against this input takes no adapter term",
                w.shape
            )));
        }
        self.gemv(w, x, Some(lora), bias, residual, gelu, y, rows)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemv(
        &self,
        w: &DeviceQuantized,
        x: u64,
        lora: Option<&LoraTerm>,
        bias: u64,
        residual: u64,
        gelu: bool,
        y: u64,
        rows_: usize,
    ) -> Result<()> {
        let [out_features, in_features] = w.shape[..] else {
            return Err(error("gemv_4bit: the weight is not a matrix"));
        };
        let kernel = self.gemv_for(w, x);
        if !w.gemv_ready() || rows_ == 0 || rows_ > kernel.max_rows() {
            return Err(error(format!(
                "gemv_4bit: {rows_} rows of a [{out_features}, {in_features}] weight with blocksize {} is not supported",
                w.blocksize
            )));
        }
        if kernel == GemvKernel::Tensor && rows_ > GEMV_TC_ROWS {
            // A pass per GEMV_TC_ROWS rows: x, y and the residual from that row on (whole rows
            // of 128-multiple widths, so x stays 16-byte aligned).
            for first in (0..rows_).step_by(GEMV_TC_ROWS) {
                let from_row = |p: u64, width: usize| match p {
                    0 => 0,
                    p => p + self.bytes(first * width) as u64,
                };
                // The adapter's xa from that row on too (f32).
                let lora = lora.map(|l| LoraTerm {
                    xa: l.xa + (4 * first * l.r) as u64,
                    ..*l
                });
                self.gemv(
                    w,
                    from_row(x, in_features),
                    lora.as_ref(),
                    bias,
                    from_row(residual, out_features),
                    gelu,
                    from_row(y, out_features),
                    (rows_ - first).min(GEMV_TC_ROWS),
                )?;
            }
            return Ok(());
        }
        let a = w.absmax_args();
        let r = match rows_ {
            1 => 0,
            2 => 1,
            _ => 2,
        };
        let (name, wave) = match kernel {
            GemvKernel::OneChunk => (["gemv_4bit_1", "gemv_4bit_2", "gemv_4bit_4"][r], None),
            GemvKernel::Wide => (GEMV_WAVE[r].0, Some(self.gemv_wave[r])),
            // The tensor-core GEMV comes in one kernel per kind of absmax, with or without an
            // adapter's term; the double-quantized one reads the 8-bit codes in step order
            // (gemv_for made sure they exist).
            GemvKernel::Tensor => {
                let names = match lora {
                    None => ["gemv_4bit_tc", "gemv_4bit_tc_dq"],
                    Some(_) => ["gemv_4bit_tc_lora", "gemv_4bit_tc_dq_lora"],
                };
                (
                    names[usize::from(a.quantized != 0)],
                    Some(self.gemv_wave[3]),
                )
            }
        };
        if lora.is_some() && kernel != GemvKernel::Tensor {
            return Err(error(
                "gemv_4bit: only the tensor-core GEMV adds an adapter's term",
            ));
        }
        // The wide and tensor-core kernels take block sizes as shifts.
        let (nested_blocksize, blocksize) = match kernel {
            GemvKernel::OneChunk => (a.nested_blocksize, w.blocksize as i32),
            _ => w.block_shifts(),
        };
        // One output feature per warp at a time (the wide kernel's warps walk several rows each,
        // in one wave), or a tile of 16 features per block for the tensor-core kernel.
        let (items, threads) = match kernel {
            GemvKernel::Tensor => (out_features.div_ceil(16), GEMV_TC_THREADS),
            _ => (
                out_features.div_ceil(GEMV_THREADS as usize / 32),
                GEMV_THREADS,
            ),
        };
        let blocks = wave.map_or(MAX_STRIDE_BLOCKS, |w| w as usize);
        let cfg = LaunchConfig {
            grid_dim: (items.min(blocks) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let quantized = match (kernel, &w.q8_by_step) {
            (GemvKernel::Tensor, Some(by_step)) => by_step.ptr(),
            _ => a.quantized,
        };
        launch!(
            self,
            name,
            cfg,
            w.packed.ptr(),
            a.absmax,
            quantized,
            a.code,
            a.nested_absmax,
            a.offset,
            nested_blocksize,
            w.code.ptr(),
            blocksize,
            x,
            bias,
            residual,
            i32::from(gelu),
            y,
            rows_ as i32,
            in_features as i32,
            out_features as i32;
            // The `_lora` kernels take the adapter's term last.
            lora.map(LoraTermArg::from)
        )
    }

    /// Whether [`Kernels::gemv_dense`] serves `rows` rows of x (at device address `x`) against
    /// a weight at `w` with `in_features` inputs: whole 16-byte words, both 16-byte aligned, at
    /// most 4 rows (more take a GEMM, which reads the weight once for any number of rows).
    pub fn gemv_dense_serves(&self, rows: usize, in_features: usize, w: u64, x: u64) -> bool {
        (1..=GEMV_DENSE_ROWS).contains(&rows)
            && self.bytes(in_features).is_multiple_of(16)
            && w.is_multiple_of(16)
            && x.is_multiple_of(16)
    }

    /// `y [rows, out] (f32) = x [rows, in] W^T` for `W [out, in]` in the activation precision,
    /// read once in 16-byte words: the LM head of a decoding step, where cuBLAS's GEMM falls
    /// short of the card's bandwidth (see `gemv_dense` in decode.cu). For what
    /// [`Kernels::gemv_dense_serves`].
    pub fn gemv_dense(
        &self,
        w: u64,
        x: u64,
        y: u64,
        rows_: usize,
        in_features: usize,
        out_features: usize,
    ) -> Result<()> {
        if !self.gemv_dense_serves(rows_, in_features, w, x) {
            return Err(error(format!(
                "gemv_dense: {rows_} rows of {in_features} inputs (x at {x:#x}, the weight at {w:#x}) are not supported"
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: (
                out_features
                    .div_ceil(GEMV_DENSE_THREADS as usize / 32)
                    .min(self.gemv_wave[4] as usize) as u32,
                1,
                1,
            ),
            block_dim: (GEMV_DENSE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "gemv_dense",
            cfg,
            w,
            x,
            y,
            rows_ as i32,
            in_features as i32,
            out_features as i32
        )
    }

    /// Copies this step's keys and values (`rows = B * heads`, `seq` tokens each; element
    /// `(row, t, d)` at `row * head_stride + t * hd + d`: `head_stride = seq * hd` when packed)
    /// into columns `past .. past + seq` of the caches `[rows, capacity, hd]`, `past` read from
    /// the device (`past_len`: one i32), so that a recorded step serves every position. Columns
    /// past the capacity are dropped: the caller checks that the tokens fit.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append(
        &self,
        [k_src, v_src]: [u64; 2],
        [k_cache, v_cache]: [u64; 2],
        rows_: usize,
        seq: usize,
        capacity: usize,
        past_len: u64,
        hd: usize,
        head_stride: usize,
    ) -> Result<()> {
        launch!(
            self,
            "kv_append",
            grid(rows_ * seq * hd, 256),
            k_src,
            v_src,
            k_cache,
            v_cache,
            rows_ as i32,
            seq as i32,
            capacity as i32,
            past_len,
            hd as i32,
            head_stride as i64
        )
    }

    /// Attention of the new queries over the KV cache (see [`CachedAttention`]); `partial` is
    /// scratch of [`CachedAttention::partial_bytes`] (0 when that is 0).
    pub fn attention_cached(&self, a: &CachedAttention, partial: u64) -> Result<()> {
        // Every column the cache can hold is covered: the launch does not depend on how many
        // are filled (read on the device), so a recorded step serves every position.
        let splits = a.splits();
        let keys_per_split = a.capacity.div_ceil(splits);
        let shared = 4 * (attention_fixed_floats(a.hd) + keys_per_split);
        if shared > ATTENTION_SHARED_BYTES {
            return Err(error(format!(
                "attention with heads of {} needs {shared} bytes of shared memory per block, \
                 more than the {ATTENTION_SHARED_BYTES} a block gets",
                a.hd
            )));
        }
        if splits > 1 && partial == 0 {
            return Err(error("attention_cached: split attention needs its scratch"));
        }
        let cfg = LaunchConfig {
            grid_dim: (a.rows() as u32, splits as u32, 1),
            block_dim: (ATTENTION_THREADS as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        launch!(
            self,
            "attention_cached",
            cfg,
            a.q,
            a.q_head_stride as i64,
            a.k_cache,
            a.v_cache,
            a.context,
            a.key_mask,
            a.slopes,
            a.positions,
            a.mask_stride as i32,
            a.heads as i32,
            a.kv_heads as i32,
            a.seq as i32,
            a.past_len,
            a.capacity as i32,
            a.hd as i32,
            a.scale,
            keys_per_split as i32,
            partial
        )?;
        if splits == 1 {
            return Ok(());
        }
        launch!(
            self,
            "attention_combine",
            rows(a.rows(), row_block(a.hd).min(128)),
            partial,
            a.v_cache,
            a.context,
            a.heads as i32,
            a.kv_heads as i32,
            a.seq as i32,
            a.past_len,
            a.capacity as i32,
            a.hd as i32,
            keys_per_split as i32,
            splits as i32
        )
    }

    /// transformers' repetition penalty on `logits [batch, vocab]` (f32) for the distinct
    /// tokens `tokens [batch, max_tokens]` (u32), `counts [batch]` (i32) of each row valid.
    #[allow(clippy::too_many_arguments)]
    pub fn repetition_penalty(
        &self,
        logits: u64,
        tokens: u64,
        counts: u64,
        batch: usize,
        max_tokens: usize,
        vocab: usize,
        penalty: f32,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (max_tokens.div_ceil(256).max(1) as u32, batch as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "repetition_penalty",
            cfg,
            logits,
            tokens,
            counts,
            max_tokens as i32,
            vocab as i32,
            penalty
        )
    }

    /// `ids [batch]` (u32) = the index of each row's largest logit (`logits [batch, vocab]` f32),
    /// the first on ties; `partial` is scratch of [`Kernels::argmax_partial_bytes`].
    pub fn argmax_rows(
        &self,
        logits: u64,
        ids: u64,
        batch: usize,
        vocab: usize,
        partial: u64,
    ) -> Result<()> {
        let slices = argmax_slices(vocab);
        let cfg = LaunchConfig {
            grid_dim: (slices as u32, batch as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let indices = partial + 4 * (batch * slices) as u64;
        launch!(
            self,
            "argmax_slices",
            cfg,
            logits,
            vocab as i32,
            vocab.div_ceil(slices) as i32,
            partial,
            indices
        )?;
        launch!(
            self,
            "argmax_pairs",
            rows(batch, row_block(slices).min(256)),
            partial,
            indices,
            slices as i32,
            ids
        )
    }

    /// Bytes of the scratch [`Kernels::argmax_rows`] needs.
    pub fn argmax_partial_bytes(batch: usize, vocab: usize) -> usize {
        8 * batch * argmax_slices(vocab)
    }

    /// Sampling's top-k of each row of `logits [batch, vocab]` (f32) scaled by
    /// `inv_temperature`: every score not below the k-th largest, as `(indices, values)`
    /// `[batch, room]` (u32, f32) in no particular order, `counts [batch]` (i32) of them per row
    /// (above `room`: only `room` were written). `1 <= k < vocab`.
    #[allow(clippy::too_many_arguments)]
    pub fn top_k_candidates(
        &self,
        logits: u64,
        batch: usize,
        vocab: usize,
        inv_temperature: f32,
        k: usize,
        [indices, values]: [u64; 2],
        room: usize,
        counts: u64,
    ) -> Result<()> {
        if k == 0 || k >= vocab {
            return Err(error(format!(
                "top_k_candidates: k = {k} must be in 1..{vocab}"
            )));
        }
        launch!(
            self,
            "top_k_candidates",
            rows(batch, 1024),
            logits,
            vocab as i32,
            inv_temperature,
            k as i32,
            indices,
            values,
            room as i32,
            counts
        )
    }

    /// Bytes of `n` activations.
    pub fn bytes(&self, n: usize) -> usize {
        n * self.t()
    }
}

/// AdamW's per-step scalars, computed on the host exactly as train/optimizer.rs does.
#[derive(Debug, Clone, Copy)]
pub struct AdamWCoefficients {
    pub decay: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub step_size: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
}

/// A 4-bit weight's absmax as the kernels take it: `absmax` (plain) or the other four (double
/// quantization), the unused ones 0.
struct AbsmaxArgs {
    absmax: u64,
    quantized: u64,
    code: u64,
    nested_absmax: u64,
    offset: f32,
    nested_blocksize: i32,
}

/// Arguments of [`Kernels::attention_cached`]: `seq` new queries per row, `q [batch, heads, seq,
/// hd]`, over the first `past + seq` columns of the caches `[batch, kv_heads, capacity, hd]` (the
/// last `seq` of them this step's), writing `context [batch, heads, seq, hd]`.
#[derive(Debug, Clone, Copy)]
pub struct CachedAttention {
    pub q: u64,
    /// Elements between the query heads (`seq * hd` when packed; see [`Kernels::kv_append`]).
    pub q_head_stride: usize,
    pub k_cache: u64,
    pub v_cache: u64,
    pub context: u64,
    /// `[batch, mask_stride]` f32: 1 real key, 0 padding (the first `past + seq` of each row).
    pub key_mask: u64,
    /// `[heads]` f32 ALiBi slopes, or 0 for none.
    pub slopes: u64,
    /// `[batch, mask_stride]` f32 ALiBi positions (ignored without slopes).
    pub positions: u64,
    pub mask_stride: usize,
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    /// One i32 on the device: the tokens cached before this step's `seq`.
    pub past_len: u64,
    pub capacity: usize,
    pub hd: usize,
    pub scale: f32,
}

impl CachedAttention {
    /// Query rows, one block each per split.
    fn rows(&self) -> usize {
        self.batch * self.heads * self.seq
    }

    /// Splits of the cache's columns: enough blocks to keep the SMs busy (at least
    /// [`MIN_KEYS_PER_SPLIT`] keys each) and each split's scores within shared memory.
    pub fn splits(&self) -> usize {
        let room = (ATTENTION_SHARED_BYTES / 4)
            .saturating_sub(attention_fixed_floats(self.hd))
            .max(1);
        let fit = self.capacity.div_ceil(room);
        let busy = ATTENTION_BLOCKS
            .div_ceil(self.rows().max(1))
            .min(self.capacity.div_ceil(MIN_KEYS_PER_SPLIT));
        busy.max(fit).max(1)
    }

    /// Bytes of the scratch [`Kernels::attention_cached`] needs: each split's partial softmax
    /// (f32 max, sum and `hd` weighted values per query row), none with one split.
    pub fn partial_bytes(&self) -> usize {
        match self.splits() {
            1 => 0,
            splits => 4 * self.rows() * splits * (self.hd + 2),
        }
    }
}

/// The absmax of a 4-bit weight on the device.
pub enum DeviceAbsmax {
    Plain(DeviceBuffer),
    Double {
        quantized: DeviceBuffer,
        /// The 256-entry signed dynamic map.
        code: DeviceBuffer,
        nested_absmax: DeviceBuffer,
        offset: f32,
        nested_blocksize: usize,
    },
}

/// A bitsandbytes 4-bit weight kept packed on the device (dequantized just in time).
pub struct DeviceQuantized {
    pub shape: Vec<usize>,
    pub numel: usize,
    pub blocksize: usize,
    packed: DeviceBuffer,
    absmax: DeviceAbsmax,
    code: DeviceBuffer,
    /// The double-quantized absmax codes in the tensor-core GEMV's order, once
    /// [`Kernels::prepare_gemv`] made them.
    q8_by_step: Option<DeviceBuffer>,
}

impl DeviceQuantized {
    pub fn upload(gpu: &Gpu, q: &Quantized4, name: &str) -> Result<DeviceQuantized> {
        q.validate()?;
        let absmax = match &q.absmax {
            Absmax::Plain(a) => DeviceAbsmax::Plain(gpu.upload(a, name)?),
            Absmax::Double(d) => DeviceAbsmax::Double {
                quantized: gpu.upload(&d.quantized, name)?,
                code: gpu.upload(&dynamic_map_signed(), name)?,
                nested_absmax: gpu.upload(&d.nested_absmax, name)?,
                offset: d.offset,
                nested_blocksize: d.nested_blocksize,
            },
        };
        Ok(DeviceQuantized {
            shape: q.shape.clone(),
            numel: q.numel(),
            blocksize: q.blocksize,
            packed: gpu.upload(&q.packed, name)?,
            absmax,
            code: gpu.upload(decode_table(q.quant_type), name)?,
            q8_by_step: None,
        })
    }

    /// Whether [`Kernels::gemv_4bit`] takes this weight: a matrix whose rows are whole 16-byte
    /// chunks of codes, each chunk within one quantization block.
    pub fn gemv_ready(&self) -> bool {
        self.shape.len() == 2
            && self.shape[1].is_multiple_of(32)
            && self.blocksize.is_multiple_of(32)
    }

    /// Whether [`GemvKernel::Wide`] serves this weight: block sizes powers of two, element
    /// indices within 31 bits.
    fn wide_gemv_ready(&self) -> bool {
        self.gemv_ready() && self.block_sizes_are_powers_of_two() && self.numel < 1 << 31
    }

    /// The block size and the nested one (if any) are powers of two (bitsandbytes only makes
    /// such), so kernels find a value's block with shifts.
    fn block_sizes_are_powers_of_two(&self) -> bool {
        let nested = match &self.absmax {
            DeviceAbsmax::Plain(_) => true,
            DeviceAbsmax::Double {
                nested_blocksize, ..
            } => nested_blocksize.is_power_of_two(),
        };
        self.blocksize.is_power_of_two() && nested
    }

    /// `(nested, block)` shifts for [`DeviceQuantized::block_sizes_are_powers_of_two`] weights
    /// (nested 0 without double quantization).
    fn block_shifts(&self) -> (i32, i32) {
        let nested = match &self.absmax {
            DeviceAbsmax::Plain(_) => 0,
            DeviceAbsmax::Double {
                nested_blocksize, ..
            } => nested_blocksize.trailing_zeros() as i32,
        };
        (nested, self.blocksize.trailing_zeros() as i32)
    }

    fn absmax_args(&self) -> AbsmaxArgs {
        match &self.absmax {
            DeviceAbsmax::Plain(a) => AbsmaxArgs {
                absmax: a.ptr(),
                quantized: 0,
                code: 0,
                nested_absmax: 0,
                offset: 0.0,
                nested_blocksize: 1,
            },
            DeviceAbsmax::Double {
                quantized,
                code,
                nested_absmax,
                offset,
                nested_blocksize,
            } => AbsmaxArgs {
                absmax: 0,
                quantized: quantized.ptr(),
                code: code.ptr(),
                nested_absmax: nested_absmax.ptr(),
                offset: *offset,
                nested_blocksize: *nested_blocksize as i32,
            },
        }
    }

    /// Device bytes held (packed codes and absmax).
    pub fn bytes(&self) -> usize {
        self.packed.bytes()
            + match &self.absmax {
                DeviceAbsmax::Plain(a) => a.bytes(),
                DeviceAbsmax::Double {
                    quantized,
                    nested_absmax,
                    ..
                } => quantized.bytes() + nested_absmax.bytes(),
            }
    }
}
