// Element-wise kernels: casts, sums, scaling, activations and their gradients, dropout.

extern "C" __global__ void cast_f32_to_t(const float* __restrict__ x, T* __restrict__ out, long long n) {
    wait_for_prior_grids();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) st(&out[i], x[i]);
}

extern "C" __global__ void cast_t_to_f32(const T* __restrict__ x, float* __restrict__ out, long long n) {
    wait_for_prior_grids();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ld(x[i]);
}

// out = a + b (out may alias a or b).
extern "C" __global__ void add(const T* a, const T* b, T* out, long long n) {
    wait_for_prior_grids();
    long long i = pack_start();
    if (i >= n) return;
    float va[PACK], vb[PACK];
    load_pack(a, i, n, va);
    load_pack(b, i, n, vb);
    for (int k = 0; k < PACK; k++) va[k] += vb[k];
    store_pack(out, i, n, va);
}

// out[r, c] += bias[c] for `rows` rows of `cols`.
extern "C" __global__ void add_bias(T* out, const T* __restrict__ bias, long long rows, int cols) {
    wait_for_prior_grids();
    long long i = pack_start(), n = rows * cols;
    if (i >= n) return;
    float v[PACK];
    load_pack(out, i, n, v);
    int c = (int)(i % cols);
    for (int k = 0; k < PACK; k++) {
        v[k] += ld(bias[c]);
        c = c + 1 == cols ? 0 : c + 1;
    }
    store_pack(out, i, n, v);
}

extern "C" __global__ void scale_f32(float* x, float factor, long long n) {
    wait_for_prior_grids();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= factor;
}

// Adds sum(x^2) (in f64) into *total.
extern "C" __global__ void sum_squares_f32(const float* __restrict__ x, long long n, double* total) {
    wait_for_prior_grids();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.0f;
    float s = block_sum(v * v);
    if (threadIdx.x == 0) atomicAdd(total, (double)s);
}

extern "C" __global__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ out, long long n) {
    wait_for_prior_grids();
    long long i = pack_start();
    if (i >= n) return;
    float v[PACK];
    load_pack(x, i, n, v);
    for (int k = 0; k < PACK; k++) v[k] = gelu_tanh(v[k]);
    store_pack(out, i, n, v);
}

// bloom_gelu_back: dx = dy * (0.5 x (1 - t^2)(0.79788456 + 0.1070322243 x^2) + 0.5 (1 + t)).
extern "C" __global__ void gelu_bwd(const T* x, const T* dy, T* dx, long long n) {
    wait_for_prior_grids();
    long long i = pack_start();
    if (i >= n) return;
    float v[PACK], g[PACK];
    load_pack(x, i, n, v);
    load_pack(dy, i, n, g);
    for (int k = 0; k < PACK; k++) {
        float t = tanhf(0.79788456f * v[k] * (1.0f + 0.044715f * v[k] * v[k]));
        float d = 0.5f * v[k] * ((1.0f - t * t) * (0.79788456f + 0.1070322243f * v[k] * v[k])) + 0.5f * (1.0f + t);
        g[k] = d * g[k];
    }
    store_pack(dx, i, n, g);
}

// LLaMA's MLP activation: out = silu(gate) * up.
extern "C" __global__ void swiglu_fwd(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, long long n) {
    wait_for_prior_grids();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = ld(gate[i]);
    float silu = g / (1.0f + expf(-g));
    st(&out[i], silu * ld(up[i]));
}

extern "C" __global__ void swiglu_bwd(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ dy,
                                      T* __restrict__ dgate, T* __restrict__ dup, long long n) {
    wait_for_prior_grids();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = ld(gate[i]), u = ld(up[i]), d = ld(dy[i]);
    float s = 1.0f / (1.0f + expf(-g));
    st(&dup[i], d * g * s);
    st(&dgate[i], d * u * s * (1.0f + g * (1.0f - s)));
}

// Inverted dropout with a mask drawn from (seed, index): out = x * keep / (1 - p). The backward
// pass is the same call on the gradient.
extern "C" __global__ void dropout(const T* x, T* out, long long n, float p, unsigned long long seed) {
    wait_for_prior_grids();
    long long i = pack_start();
    if (i >= n) return;
    float v[PACK];
    load_pack(x, i, n, v);
    for (int k = 0; k < PACK; k++) v[k] *= uniform_hash(seed, i + k) >= p ? 1.0f / (1.0f - p) : 0.0f;
    store_pack(out, i, n, v);
}

// out[i, :] = table[ids[i], :].
extern "C" __global__ void embedding_fwd(const unsigned int* __restrict__ ids, const T* __restrict__ table,
                                         T* __restrict__ out, int hidden) {
    wait_for_prior_grids();
    long long row = blockIdx.x;
    const T* src = table + (long long)ids[row] * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) out[row * hidden + c] = src[c];
}

// out[ids[i], :] = src[i, :]: the inverse of embedding_fwd's gather.
extern "C" __global__ void scatter_rows(const unsigned int* __restrict__ ids, const T* __restrict__ src,
                                       T* __restrict__ out, int hidden) {
    wait_for_prior_grids();
    long long row = blockIdx.x;
    T* dst = out + (long long)ids[row] * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = src[row * hidden + c];
}

// acc (f32) += x (T): a gradient summed in f32 from several products.
extern "C" __global__ void add_into_f32(float* acc, const T* __restrict__ x, long long n) {
    wait_for_prior_grids();
    long long i = pack_start();
    if (i >= n) return;
    float va[PACK], vx[PACK];
    load_pack(acc, i, n, va);
    load_pack(x, i, n, vx);
    for (int k = 0; k < PACK; k++) va[k] += vx[k];
    store_pack(acc, i, n, va);
}
