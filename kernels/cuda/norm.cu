// LayerNorm and RMSNorm over the last dimension, one block per row, statistics in f32.

// The forward kernels read a row once: each thread keeps up to NORM_PACKS packs of it in
// registers (pack p of thread i holds elements (p * blockDim.x + i) * PACK ..), so a row of
// up to 1024 * PACK * NORM_PACKS values is one load, the statistics from registers, one store.
// In a decoding step the row is a single 4096-value vector and the kernels' cost is latency.
// __launch_bounds__(1024): the register budget of a full block (16 values held per thread).
#define NORM_PACKS 2

__device__ __forceinline__ int norm_pack_start(int p) { return (p * blockDim.x + threadIdx.x) * PACK; }

__device__ __forceinline__ void load_norm_row(const T* __restrict__ xr, int dim, float (&v)[NORM_PACKS][PACK]) {
#pragma unroll
    for (int p = 0; p < NORM_PACKS; p++) load_pack(xr, norm_pack_start(p), dim, v[p]);
}

// LayerNorm: (x - mean) / sqrt(var + eps) * w + b, biased variance; saves mean and rstd.
extern "C" __global__ void __launch_bounds__(1024) layernorm_fwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                         T* __restrict__ out, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                         int dim, float eps) {
    wait_for_prior_grids();
    long long row = blockIdx.x;
    float v[NORM_PACKS][PACK];
    load_norm_row(x + row * dim, dim, v);
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < NORM_PACKS; p++)
#pragma unroll
        for (int k = 0; k < PACK; k++) s += v[p][k];  // zero beyond the row
    float mean = block_sum(s) / dim;
    float sq = 0.0f;
#pragma unroll
    for (int p = 0; p < NORM_PACKS; p++)
#pragma unroll
        for (int k = 0; k < PACK; k++) {
            float d = norm_pack_start(p) + k < dim ? v[p][k] - mean : 0.0f;
            sq += d * d;
        }
    float var = block_sum(sq) / dim;
    float rstd = 1.0f / sqrtf(var + eps);
#pragma unroll
    for (int p = 0; p < NORM_PACKS; p++) {
        int i = norm_pack_start(p);
        if (i >= dim) break;
        float wp[PACK], bp[PACK] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        load_pack(w, i, dim, wp);
        if (b != nullptr) load_pack(b, i, dim, bp);
        float y[PACK];
#pragma unroll
        for (int k = 0; k < PACK; k++) y[k] = (v[p][k] - mean) * rstd * wp[k] + bp[k];
        store_pack(out + row * dim, i, dim, y);
    }
    if (threadIdx.x == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
}

// dx (+)= rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w. `accumulate` adds into dx.
extern "C" __global__ void layernorm_bwd(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                         const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                         T* dx, int dim, int accumulate) {
    wait_for_prior_grids();
    long long row = blockIdx.x;
    const T* xr = x + row * dim;
    const T* dyr = dy + row * dim;
    float mean = mean_in[row], rstd = rstd_in[row];
    float sg = 0.0f, sgx = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float g = ld(dyr[c]) * ld(w[c]);
        float xhat = (ld(xr[c]) - mean) * rstd;
        sg += g; sgx += g * xhat;
    }
    float mg = block_sum(sg) / dim, mgx = block_sum(sgx) / dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float g = ld(dyr[c]) * ld(w[c]);
        float xhat = (ld(xr[c]) - mean) * rstd;
        float d = rstd * (g - mg - xhat * mgx);
        if (accumulate) d += ld(dx[row * dim + c]);
        st(&dx[row * dim + c], d);
    }
}

// RMSNorm: x * rsqrt(mean(x^2) + eps) * w; saves rstd.
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out,
                                       float* __restrict__ rstd_out, int dim, float eps) {
    wait_for_prior_grids();
    long long row = blockIdx.x;
    float v[NORM_PACKS][PACK];
    load_norm_row(x + row * dim, dim, v);
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < NORM_PACKS; p++)
#pragma unroll
        for (int k = 0; k < PACK; k++) s += v[p][k] * v[p][k];
    float rstd = 1.0f / sqrtf(block_sum(s) / dim + eps);
#pragma unroll
    for (int p = 0; p < NORM_PACKS; p++) {
        int i = norm_pack_start(p);
        if (i >= dim) break;
        float wp[PACK], y[PACK];
        load_pack(w, i, dim, wp);
#pragma unroll
        for (int k = 0; k < PACK; k++) y[k] = v[p][k] * rstd * wp[k];
        store_pack(out + row * dim, i, dim, y);
    }
    if (threadIdx.x == 0) rstd_out[row] = rstd;
}

// dx (+)= rstd * (g - xhat * mean(g * xhat)), g = dy * w.
extern "C" __global__ void rmsnorm_bwd(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                       const float* __restrict__ rstd_in, T* dx, int dim, int accumulate) {
    wait_for_prior_grids();
    long long row = blockIdx.x;
    const T* xr = x + row * dim;
    const T* dyr = dy + row * dim;
    float rstd = rstd_in[row];
    float sgx = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) sgx += ld(dyr[c]) * ld(w[c]) * ld(xr[c]) * rstd;
    float mgx = block_sum(sgx) / dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float xhat = ld(xr[c]) * rstd;
        float d = rstd * (ld(dyr[c]) * ld(w[c]) - xhat * mgx);
        if (accumulate) d += ld(dx[row * dim + c]);
        st(&dx[row * dim + c], d);
    }
}
