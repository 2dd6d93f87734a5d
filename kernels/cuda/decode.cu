// Generation kernels: the fused 4-bit GEMV of decoding (a few token rows against a packed
// weight, read once), attention of new queries over the KV cache, appending to the cache, and
// the greedy choice (repetition penalty, argmax) on the device.

// y[r, o] = sum_i x[r, i] * W[o, i] (+ bias[o]) for r < rows <= R, W bitsandbytes 4-bit
// [out, in]. Each lane reads its rows' x from L1 once per chunk, so the cost grows with the rows:
// beyond four, dequantization and a tensor-core GEMM are faster. One warp per output feature (grid-stride); each lane reads 16 bytes (32 codes) at
// a time, the next 16 already in flight. The caller guarantees in % 32 == 0 and blocksize % 32
// == 0, so those 32 codes share one absmax and a weight row starts 16-byte aligned. The codes of
// a chunk are summed against x first and scaled by the block's absmax once (the dequantized
// weight is never formed). R is a compile-time bound so that the accumulators stay in registers.
template <int R>
__device__ void gemv_4bit(const uint4* __restrict__ packed, const float* __restrict__ absmax,
                          const unsigned char* __restrict__ absmax_q8, const float* __restrict__ code2,
                          const float* __restrict__ absmax2, float offset, int nested_blocksize,
                          const float* __restrict__ code16, int blocksize, const T* __restrict__ x,
                          const T* __restrict__ bias, T* __restrict__ y, int rows, int in_features,
                          int out_features) {
    __shared__ float code[16];
    __shared__ float code_nested[256];
    load_code_tables(code16, code2, absmax_q8 != nullptr, code, code_nested);
    int lane = threadIdx.x & 31;
    int warps = blockDim.x / 32;
    int chunks = in_features / 32;
    for (int o = blockIdx.x * warps + threadIdx.x / 32; o < out_features; o += gridDim.x * warps) {
        const uint4* w_row = packed + (long long)o * chunks;
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = 0.0f;
        uint4 next = lane < chunks ? __ldg(w_row + lane) : make_uint4(0, 0, 0, 0);
        for (int c = lane; c < chunks; c += 32) {
            uint4 word = next;
            if (c + 32 < chunks) next = __ldg(w_row + c + 32);
            long long first = (long long)o * in_features + 32LL * c;
            float scale = block_absmax(first / blocksize, absmax, absmax_q8, code_nested, absmax2, offset,
                                       nested_blocksize);
            float w[32];
            unsigned int parts[4] = {word.x, word.y, word.z, word.w};
#pragma unroll
            for (int p = 0; p < 4; p++) {
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    unsigned int b = (parts[p] >> (8 * j)) & 0xffu;
                    w[8 * p + 2 * j] = code[b >> 4];
                    w[8 * p + 2 * j + 1] = code[b & 15u];
                }
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (r < rows) {
                    const T* xr = x + (long long)r * in_features + 32LL * c;
                    float dot = 0.0f;
#pragma unroll
                    for (int p = 0; p < 4; p++) {
                        float v[PACK];
                        load_pack(xr, 8 * p, 32, v);
#pragma unroll
                        for (int k = 0; k < PACK; k++) dot = fmaf(w[8 * p + k], v[k], dot);
                    }
                    acc[r] = fmaf(dot, scale, acc[r]);
                }
            }
        }
        float b = bias != nullptr ? ld(bias[o]) : 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) {
            float v = warp_sum(acc[r]);
            if (lane == 0 && r < rows) st(&y[(long long)r * out_features + o], v + b);
        }
    }
}

#define GEMV_4BIT(R)                                                                                      \
    extern "C" __global__ void gemv_4bit_##R(                                                             \
        const uint4* packed, const float* absmax, const unsigned char* absmax_q8, const float* code2,      \
        const float* absmax2, float offset, int nested_blocksize, const float* code16, int blocksize,      \
        const T* x, const T* bias, T* y, int rows, int in_features, int out_features) {                    \
        gemv_4bit<R>(packed, absmax, absmax_q8, code2, absmax2, offset, nested_blocksize, code16, blocksize, \
                     x, bias, y, rows, in_features, out_features);                                        \
    }
GEMV_4BIT(1)
GEMV_4BIT(2)
GEMV_4BIT(4)

// src [B, heads, T, hd] -> columns past .. past + T of the cache [B, heads, capacity, hd].
extern "C" __global__ void kv_append(const T* __restrict__ src, T* __restrict__ cache, int rows, int seq,
                                     int capacity, int past, int hd) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * seq * hd) return;
    int d = i % hd;
    long long r = i / hd;
    int t = r % seq;
    long long bh = r / seq;
    cache[(bh * capacity + past + t) * hd + d] = src[i];
}

// Attention of new queries q [B, heads, T, hd] over the cached keys and values
// [B, kv_heads, capacity, hd] (the first `keys` columns filled, the last T of them this step's):
// context [B, heads, T, hd]. Query t sees keys j <= keys - T + t that are real (key_mask
// [B, keys]); ALiBi adds slope[h] * positions[b, j] when slopes != null. A row that sees no key
// gets uniform weights, as the training softmax (and transformers' eager attention) gives it.
// One block per query; its scores live in dynamic shared memory (hd + keys floats).
extern "C" __global__ void attention_cached(const T* __restrict__ q, const T* __restrict__ k_cache,
                                            const T* __restrict__ v_cache, T* __restrict__ context,
                                            const float* __restrict__ key_mask, const float* __restrict__ slopes,
                                            const float* __restrict__ positions, int heads, int kv_heads, int seq,
                                            int keys, int capacity, int hd, float scale) {
    extern __shared__ float shared[];
    float* q_row = shared;
    float* p = shared + hd;
    long long row = blockIdx.x;
    int t = row % seq;
    long long bh = row / seq;
    int h = bh % heads;
    long long b = bh / heads;
    int kv = h / (heads / kv_heads);
    const T* k_base = k_cache + (b * kv_heads + kv) * capacity * hd;
    const T* v_base = v_cache + (b * kv_heads + kv) * capacity * hd;
    const float* mask = key_mask + b * keys;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) q_row[d] = ld(q[row * hd + d]);
    __syncthreads();
    int last = keys - seq + t;
    float slope = slopes != nullptr ? slopes[h] : 0.0f;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int j = warp; j < keys; j += warps) {
        float dot = 0.0f;
        for (int d = lane; d < hd; d += 32) dot += q_row[d] * ld(k_base[(long long)j * hd + d]);
        dot = warp_sum(dot);
        if (lane == 0) {
            bool visible = j <= last && mask[j] != 0.0f;
            float bias = slopes != nullptr ? slope * positions[b * keys + j] : 0.0f;
            p[j] = visible ? dot * scale + bias : -QLORA_INFINITY;
        }
    }
    __syncthreads();
    float mx = -QLORA_INFINITY;
    for (int j = threadIdx.x; j < keys; j += blockDim.x) mx = fmaxf(mx, p[j]);
    mx = block_max(mx);
    if (mx == -QLORA_INFINITY) {
        for (int j = threadIdx.x; j < keys; j += blockDim.x) p[j] = 1.0f / keys;
    } else {
        float sum = 0.0f;
        for (int j = threadIdx.x; j < keys; j += blockDim.x) {
            float e = p[j] == -QLORA_INFINITY ? 0.0f : expf(p[j] - mx);
            p[j] = e;
            sum += e;
        }
        sum = block_sum(sum);
        float inv = 1.0f / sum;
        for (int j = threadIdx.x; j < keys; j += blockDim.x) p[j] *= inv;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < keys; j++) acc = fmaf(p[j], ld(v_base[(long long)j * hd + d]), acc);
        st(&context[row * hd + d], acc);
    }
}

// transformers' RepetitionPenaltyLogitsProcessor on logits [B, vocab] (f32): each listed token
// (tokens [B, max_tokens], counts[b] of them valid, each token once) is divided by the penalty
// when positive and multiplied by it when negative.
extern "C" __global__ void repetition_penalty(float* logits, const unsigned int* __restrict__ tokens,
                                              const int* __restrict__ counts, int max_tokens, int vocab,
                                              float penalty) {
    int b = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= counts[b]) return;
    unsigned int token = tokens[(long long)b * max_tokens + i];
    float* l = logits + (long long)b * vocab + token;
    *l = *l < 0.0f ? *l * penalty : *l / penalty;
}

// ids[b] = argmax of logits row b (f32 [B, vocab]), the first index on ties (NaN never wins).
// One block per row.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, unsigned int* __restrict__ ids, int vocab) {
    __shared__ float best_value[32];
    __shared__ int best_index[32];
    const float* row = logits + (long long)blockIdx.x * vocab;
    float value = -QLORA_INFINITY;
    int index = vocab;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = row[j];
        if (v > value || (index == vocab && v == value)) { value = v; index = j; }
    }
    // Reduce (value, index): larger value wins, then the smaller index.
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(0xffffffffu, value, o);
        int i = __shfl_xor_sync(0xffffffffu, index, o);
        if (v > value || (v == value && i < index)) { value = v; index = i; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { best_value[warp] = value; best_index[warp] = index; }
    __syncthreads();
    if (warp == 0) {
        int warps = blockDim.x >> 5;
        value = lane < warps ? best_value[lane] : -QLORA_INFINITY;
        index = lane < warps ? best_index[lane] : vocab;
        for (int o = 16; o > 0; o >>= 1) {
            float v = __shfl_xor_sync(0xffffffffu, value, o);
            int i = __shfl_xor_sync(0xffffffffu, index, o);
            if (v > value || (v == value && i < index)) { value = v; index = i; }
        }
        // Every logit -inf or NaN: token 0, as a host argmax over such a row gives.
        if (lane == 0) ids[blockIdx.x] = index == vocab ? 0u : (unsigned int)index;
    }
}
