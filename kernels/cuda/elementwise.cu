// Element-wise kernels: casts, sums, scaling, activations and their gradients, dropout.

extern "C" __global__ void cast_f32_to_t(const float* __restrict__ x, T* __restrict__ out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) st(&out[i], x[i]);
}

extern "C" __global__ void cast_t_to_f32(const T* __restrict__ x, float* __restrict__ out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ld(x[i]);
}

// out = a + b (out may alias a or b).
extern "C" __global__ void add(const T* a, const T* b, T* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) st(&out[i], ld(a[i]) + ld(b[i]));
}

// out[r, c] += bias[c] for `rows` rows of `cols`.
extern "C" __global__ void add_bias(T* out, const T* __restrict__ bias, long long rows, int cols) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * cols) st(&out[i], ld(out[i]) + ld(bias[i % cols]));
}

extern "C" __global__ void scale_f32(float* x, float factor, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= factor;
}

// Adds sum(x^2) (in f64) into *total.
extern "C" __global__ void sum_squares_f32(const float* __restrict__ x, long long n, double* total) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.0f;
    float s = block_sum(v * v);
    if (threadIdx.x == 0) atomicAdd(total, (double)s);
}

// BLOOM's tanh GELU, operation for operation as bloom_gelu_forward.
extern "C" __global__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = ld(x[i]);
    float inner = (v * 0.79788456f) * (v * 0.044715f * v + 1.0f);
    st(&out[i], (v * 0.5f) * (tanhf(inner) + 1.0f));
}

// bloom_gelu_back: dx = dy * (0.5 x (1 - t^2)(0.79788456 + 0.1070322243 x^2) + 0.5 (1 + t)).
extern "C" __global__ void gelu_bwd(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = ld(x[i]);
    float t = tanhf(0.79788456f * v * (1.0f + 0.044715f * v * v));
    float d = 0.5f * v * ((1.0f - t * t) * (0.79788456f + 0.1070322243f * v * v)) + 0.5f * (1.0f + t);
    st(&dx[i], d * ld(dy[i]));
}

// LLaMA's MLP activation: out = silu(gate) * up.
extern "C" __global__ void swiglu_fwd(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = ld(gate[i]);
    float silu = g / (1.0f + expf(-g));
    st(&out[i], silu * ld(up[i]));
}

extern "C" __global__ void swiglu_bwd(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ dy,
                                      T* __restrict__ dgate, T* __restrict__ dup, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = ld(gate[i]), u = ld(up[i]), d = ld(dy[i]);
    float s = 1.0f / (1.0f + expf(-g));
    st(&dup[i], d * g * s);
    st(&dgate[i], d * u * s * (1.0f + g * (1.0f - s)));
}

// Inverted dropout with a mask drawn from (seed, index): out = x * keep / (1 - p). The backward
// pass is the same call on the gradient.
extern "C" __global__ void dropout(const T* __restrict__ x, T* __restrict__ out, long long n, float p, unsigned long long seed) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float keep = uniform_hash(seed, i) >= p ? 1.0f / (1.0f - p) : 0.0f;
    st(&out[i], ld(x[i]) * keep);
}

// out[i, :] = table[ids[i], :].
extern "C" __global__ void embedding_fwd(const unsigned int* __restrict__ ids, const T* __restrict__ table,
                                         T* __restrict__ out, int hidden) {
    long long row = blockIdx.x;
    const T* src = table + (long long)ids[row] * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) out[row * hidden + c] = src[c];
}

// acc (f32) += x (T): a gradient summed in f32 from several products.
extern "C" __global__ void add_into_f32(float* acc, const T* __restrict__ x, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] += ld(x[i]);
}
