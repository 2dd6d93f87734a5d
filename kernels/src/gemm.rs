//! Matrix products through cuBLASLt, in row-major terms: `C = alpha * op(A) op(B) + beta * C`
//! with `op(A)` `[m, k]`, `op(B)` `[k, n]`, `C` `[m, n]`, optionally batched with strides.
//! A and B share one type (f32 or bf16); C may be f32 for bf16 inputs (scores, gradient
//! accumulation). Compute is always f32 (`CUBLAS_COMPUTE_32F`: no TF32 in the f32 check mode).

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::result as driver;
use qlora_core::Result;

use crate::device::{Gpu, Inner};
use crate::{error, Precision};

const WORKSPACE_BYTES: usize = 32 << 20;

/// One (batched) product. Leading dimensions are those of the row-major storage: `lda` is the
/// row length of A as stored (`k` for a plain `[m, k]` A, `m` for a transposed one).
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    /// A is stored `[k, m]` and used transposed.
    pub a_trans: bool,
    pub lda: usize,
    pub b: u64,
    /// B is stored `[n, k]` and used transposed (a weight `[out, in]` times an input).
    pub b_trans: bool,
    pub ldb: usize,
    pub c: u64,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
    /// `(count, stride_a, stride_b, stride_c)` in elements.
    pub batch: Option<(usize, usize, usize, usize)>,
    pub ab: Precision,
    pub c_type: Precision,
}

impl Gemm {
    /// `C [m, n] = op(A) op(B)` with contiguous operands of type `ab` and a C of type `c_type`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        a_trans: bool,
        b: u64,
        b_trans: bool,
        c: u64,
        ab: Precision,
        c_type: Precision,
    ) -> Gemm {
        Gemm {
            m,
            n,
            k,
            a,
            a_trans,
            lda: if a_trans { m } else { k },
            b,
            b_trans,
            ldb: if b_trans { k } else { n },
            c,
            ldc: n,
            alpha: 1.0,
            beta: 0.0,
            batch: None,
            ab,
            c_type,
        }
    }

    pub fn alpha(mut self, alpha: f32) -> Gemm {
        self.alpha = alpha;
        self
    }

    /// Adds into C (`beta = 1`).
    pub fn accumulate(mut self) -> Gemm {
        self.beta = 1.0;
        self
    }

    pub fn batched(
        mut self,
        count: usize,
        stride_a: usize,
        stride_b: usize,
        stride_c: usize,
    ) -> Gemm {
        self.batch = Some((count, stride_a, stride_b, stride_c));
        self
    }
}

fn data_type(p: Precision) -> sys::cudaDataType {
    match p {
        Precision::F32 => sys::cudaDataType::CUDA_R_32F,
        Precision::Bf16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

fn lt_error(what: &str, e: lt::CublasError) -> qlora_core::Error {
    error(format!("cuBLASLt: {what} failed ({:?})", e.0))
}

/// The largest power of two (up to 256) dividing an address: cuBLASLt picks kernels by it.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        return 256;
    }
    (1u32 << ptr.trailing_zeros().min(8)).min(256)
}

#[derive(Hash, PartialEq, Eq, Clone, Copy)]
struct AlgoKey {
    dims: [usize; 6],
    trans: (bool, bool),
    batch: Option<(usize, usize, usize, usize)>,
    types: (Precision, Precision),
    align: [u32; 3],
    beta_zero: bool,
}

/// How a product of one shape runs: a cuBLASLt algorithm, or (for shapes cuBLASLt has none
/// for, such as rank-4 LoRA matrices in bf16 whose rows are not 16-byte multiples) cuBLAS's
/// strided batched GEMM.
#[derive(Clone, Copy)]
enum Algo {
    Lt(sys::cublasLtMatmulAlgo_t),
    Cublas,
}

/// A shape's cuBLASLt descriptors (kept: making them costs more host time than a small
/// product's GPU time) and algorithm.
struct Plan {
    d: Descriptors,
    algo: Algo,
}

pub(crate) struct GemmState {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    plans: HashMap<AlgoKey, Plan>,
    /// Created on the first shape that needs it.
    cublas: Option<cudarc::cublas::sys::cublasHandle_t>,
}

// SAFETY: the handle and workspace are used under the Gpu's mutex, on its one stream.
unsafe impl Send for GemmState {}

impl Drop for GemmState {
    fn drop(&mut self) {
        // SAFETY: created in `GemmState::new`, destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
            if let Some(h) = self.cublas {
                let _ = cudarc::cublas::result::destroy_handle(h);
            }
            let _ = driver::free_sync(self.workspace);
        }
    }
}

impl GemmState {
    fn new(inner: &Inner) -> Result<GemmState> {
        let handle = lt::create_handle().map_err(|e| lt_error("creating a handle", e))?;
        // SAFETY: a plain allocation, freed in Drop.
        let workspace = unsafe { driver::malloc_sync(WORKSPACE_BYTES) }
            .map_err(|e| error(format!("allocating the cuBLASLt workspace: {e:?}")))?;
        inner.track(WORKSPACE_BYTES);
        Ok(GemmState {
            handle,
            workspace,
            plans: HashMap::new(),
            cublas: None,
        })
    }
}

/// cuBLASLt descriptors, destroyed with their plan (or when making one fails).
struct Descriptors {
    layouts: Vec<sys::cublasLtMatrixLayout_t>,
    desc: Option<sys::cublasLtMatmulDesc_t>,
    pref: Option<sys::cublasLtMatmulPreference_t>,
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each was created once in `Gpu::gemm` and is destroyed once.
        unsafe {
            for &l in &self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            if let Some(d) = self.desc {
                let _ = lt::destroy_matmul_desc(d);
            }
            if let Some(p) = self.pref {
                let _ = lt::destroy_matmul_pref(p);
            }
        }
    }
}

unsafe fn set_attr<A, V>(
    f: unsafe fn(A, V, *const c_void, usize) -> std::result::Result<(), lt::CublasError>,
    obj: A,
    attr: V,
    value: &impl Sized,
) -> Result<()> {
    f(
        obj,
        attr,
        value as *const _ as *const c_void,
        std::mem::size_of_val(value),
    )
    .map_err(|e| lt_error("setting an attribute", e))
}

impl Gpu {
    /// Queues `g` on the device's stream.
    pub fn gemm(&self, g: &Gemm) -> Result<()> {
        let mut guard = self
            .inner
            .gemm
            .lock()
            .map_err(|_| error("cuBLASLt state poisoned"))?;
        if guard.is_none() {
            *guard = Some(GemmState::new(&self.inner)?);
        }
        let state = guard.as_mut().expect("set above");
        let key = AlgoKey {
            dims: [g.m, g.n, g.k, g.lda, g.ldb, g.ldc],
            trans: (g.a_trans, g.b_trans),
            batch: g.batch,
            types: (g.ab, g.c_type),
            align: [alignment(g.a), alignment(g.b), alignment(g.c)],
            beta_zero: g.beta == 0.0,
        };
        if !state.plans.contains_key(&key) {
            let plan = plan(state.handle, g, &key)?;
            state.plans.insert(key, plan);
        }
        let plan = &state.plans[&key];
        let algo = match plan.algo {
            Algo::Cublas => return self.cublas_gemm(state, g),
            Algo::Lt(algo) => algo,
        };
        let [a_layout, b_layout, c_layout] = [0, 1, 2].map(|i| plan.d.layouts[i]);
        let desc = plan.d.desc.expect("made with the plan");
        // SAFETY: the operands are device ranges the caller sized for this product; cuBLAS's A
        // is our B (see `plan`).
        unsafe {
            lt::matmul(
                state.handle,
                desc,
                &g.alpha as *const f32 as *const c_void,
                &g.beta as *const f32 as *const c_void,
                g.b as *const c_void,
                a_layout,
                g.a as *const c_void,
                b_layout,
                g.c as *const c_void,
                c_layout,
                g.c as *mut c_void,
                c_layout,
                &algo,
                state.workspace as *mut c_void,
                WORKSPACE_BYTES,
                self.inner.stream.cu_stream() as _,
            )
        }
        .map_err(|e| lt_error(&format!("running {g:?}"), e))
    }

    /// `g` through cuBLAS (column-major operands as prepared by [`Gpu::gemm`]).
    fn cublas_gemm(&self, state: &mut GemmState, g: &Gemm) -> Result<()> {
        let (m, n, k) = (g.n as u64, g.m as u64, g.k as u64);
        let (ta, tb) = (g.b_trans, g.a_trans);
        use cudarc::cublas::{result as blas, sys as bsys};
        let blas_error =
            |what: &str, e: blas::CublasError| error(format!("cuBLAS: {what} failed ({:?})", e.0));
        let handle = match state.cublas {
            Some(h) => h,
            None => {
                let h = blas::create_handle().map_err(|e| blas_error("creating a handle", e))?;
                // SAFETY: binds the new handle to this device's stream.
                unsafe { blas::set_stream(h, self.inner.stream.cu_stream() as _) }
                    .map_err(|e| blas_error("setting the stream", e))?;
                state.cublas = Some(h);
                h
            }
        };
        let op = |t: bool| {
            if t {
                bsys::cublasOperation_t::CUBLAS_OP_T
            } else {
                bsys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let ty = |p: Precision| match p {
            Precision::F32 => bsys::cudaDataType::CUDA_R_32F,
            Precision::Bf16 => bsys::cudaDataType::CUDA_R_16BF,
        };
        let (count, sa, sb, sc) = g.batch.unwrap_or((1, 0, 0, 0));
        // SAFETY: the operands are device ranges the caller sized for this product.
        unsafe {
            blas::gemm_strided_batched_ex(
                handle,
                op(ta),
                op(tb),
                m as i32,
                n as i32,
                k as i32,
                &g.alpha as *const f32 as *const c_void,
                g.b as *const c_void,
                ty(g.ab),
                g.ldb as i32,
                sb as i64,
                g.a as *const c_void,
                ty(g.ab),
                g.lda as i32,
                sa as i64,
                &g.beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                ty(g.c_type),
                g.ldc as i32,
                sc as i64,
                count as i32,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_error(&format!("running {g:?}"), e))
    }
}

/// The cuBLASLt descriptors and algorithm of products of `g`'s shape. Row-major
/// `C = op(A) op(B)` is column-major `C^T = op(B)^T op(A)^T`: cuBLAS's A is our B.
fn plan(handle: sys::cublasLtHandle_t, g: &Gemm, key: &AlgoKey) -> Result<Plan> {
    let (m, n, k) = (g.n as u64, g.m as u64, g.k as u64);
    let (ta, tb) = (g.b_trans, g.a_trans);
    let (a_rows, a_cols) = if ta { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if tb { (n, k) } else { (k, n) };
    let mut d = Descriptors {
        layouts: Vec::new(),
        desc: None,
        pref: None,
    };
    let (sa, sb, sc) = g.batch.map(|(_, a, b, c)| (a, b, c)).unwrap_or((0, 0, 0));
    for (p, rows, cols, ld, stride) in [
        (g.ab, a_rows, a_cols, g.ldb, sb),
        (g.ab, b_rows, b_cols, g.lda, sa),
        (g.c_type, m, n, g.ldc, sc),
    ] {
        let l = lt::create_matrix_layout(data_type(p), rows, cols, ld as i64)
            .map_err(|e| lt_error("creating a layout", e))?;
        d.layouts.push(l);
        if let Some((count, ..)) = g.batch {
            let (count, stride) = (count as i32, stride as i64);
            use sys::cublasLtMatrixLayoutAttribute_t as L;
            // SAFETY: attributes of the layout created above, with values of their types.
            unsafe {
                set_attr(
                    lt::set_matrix_layout_attribute,
                    l,
                    L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    &count,
                )?;
                set_attr(
                    lt::set_matrix_layout_attribute,
                    l,
                    L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &stride,
                )?;
            }
        }
    }
    let desc = lt::create_matmul_desc(
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType::CUDA_R_32F,
    )
    .map_err(|e| lt_error("creating a matmul descriptor", e))?;
    d.desc = Some(desc);
    let op = |t: bool| {
        if t {
            cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let pref = lt::create_matmul_pref().map_err(|e| lt_error("creating a preference", e))?;
    d.pref = Some(pref);
    let ws = WORKSPACE_BYTES as u64;
    // SAFETY: attributes of the descriptor and preference created above.
    unsafe {
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        set_attr(
            lt::set_matmul_desc_attribute,
            desc,
            D::CUBLASLT_MATMUL_DESC_TRANSA,
            &op(ta),
        )?;
        set_attr(
            lt::set_matmul_desc_attribute,
            desc,
            D::CUBLASLT_MATMUL_DESC_TRANSB,
            &op(tb),
        )?;
        set_attr(
            lt::set_matmul_pref_attribute,
            pref,
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws,
        )?;
        set_attr(
            lt::set_matmul_pref_attribute,
            pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            &key.align[1],
        )?;
        set_attr(
            lt::set_matmul_pref_attribute,
            pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            &key.align[0],
        )?;
        set_attr(
            lt::set_matmul_pref_attribute,
            pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            &key.align[2],
        )?;
        set_attr(
            lt::set_matmul_pref_attribute,
            pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            &key.align[2],
        )?;
    }
    let [a, b, c] = [0, 1, 2].map(|i| d.layouts[i]);
    // SAFETY: every descriptor is live.
    let algo = match unsafe { lt::get_matmul_algo_heuristic(handle, desc, a, b, c, c, pref) } {
        Ok(h) => Algo::Lt(h.algo),
        // cuBLASLt has no kernel for some shapes (rank-4 bf16 LoRA matrices): cuBLAS has.
        Err(_) => Algo::Cublas,
    };
    Ok(Plan { d, algo })
}
