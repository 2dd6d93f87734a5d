// LayerNorm and RMSNorm over the last dimension, one block per row, statistics in f32.

// LayerNorm: (x - mean) / sqrt(var + eps) * w + b, biased variance; saves mean and rstd.
extern "C" __global__ void layernorm_fwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                         T* __restrict__ out, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                         int dim, float eps) {
    long long row = blockIdx.x;
    const T* xr = x + row * dim;
    float s = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) s += ld(xr[c]);
    float mean = block_sum(s) / dim;
    float v = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) { float d = ld(xr[c]) - mean; v += d * d; }
    float var = block_sum(v) / dim;
    float rstd = 1.0f / sqrtf(var + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float y = (ld(xr[c]) - mean) * rstd * ld(w[c]);
        if (b != nullptr) y += ld(b[c]);
        st(&out[row * dim + c], y);
    }
    if (threadIdx.x == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
}

// dx (+)= rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w. `accumulate` adds into dx.
extern "C" __global__ void layernorm_bwd(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                         const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                         T* dx, int dim, int accumulate) {
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
extern "C" __global__ void rmsnorm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out,
                                       float* __restrict__ rstd_out, int dim, float eps) {
    long long row = blockIdx.x;
    const T* xr = x + row * dim;
    float s = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) { float v = ld(xr[c]); s += v * v; }
    float rstd = 1.0f / sqrtf(block_sum(s) / dim + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) st(&out[row * dim + c], ld(xr[c]) * rstd * ld(w[c]));
    if (threadIdx.x == 0) rstd_out[row] = rstd;
}

// dx (+)= rstd * (g - xhat * mean(g * xhat)), g = dy * w.
extern "C" __global__ void rmsnorm_bwd(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                       const float* __restrict__ rstd_in, T* dx, int dim, int accumulate) {
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
