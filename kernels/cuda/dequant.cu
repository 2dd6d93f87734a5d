// bitsandbytes 4-bit dequantization (NF4 / FP4, blockwise absmax, optionally double-quantized):
// out[i] = code[nibble(i)] * absmax(block of i), one f32 product rounded to T, the even element
// in the high nibble. With double quant the block's absmax is itself
// ftz(code2[q8[b]] * absmax2[b / nested]) + offset, as bitsandbytes expands it.

__device__ __forceinline__ float ftz(float x) { return fabsf(x) < 1.17549435e-38f ? copysignf(0.0f, x) : x; }

// The 16 4-bit code values and, with double quant, the 256 absmax codes into shared memory
// (every thread of the block calls this; it ends with a barrier).
__device__ __forceinline__ void load_code_tables(const float* code16, const float* code2, bool nested,
                                                 float* code, float* code_nested) {
    if (threadIdx.x < 16) code[threadIdx.x] = code16[threadIdx.x];
    if (nested)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) code_nested[i] = code2[i];
    __syncthreads();
}

// A double-quantized absmax from its 8-bit code's table entry and its nested absmax.
__device__ __forceinline__ float expand_absmax(float code_entry, float nested, float offset) {
    return __fadd_rn(ftz(__fmul_rn(ftz(code_entry), ftz(nested))), offset);
}

// Block `block`'s absmax: stored, or expanded from its 8-bit code as bitsandbytes does.
__device__ __forceinline__ float block_absmax(long long block, const float* absmax, const unsigned char* absmax_q8,
                                              const float* code_nested, const float* absmax2, float offset,
                                              int nested_blocksize) {
    if (absmax_q8 == nullptr) return absmax[block];
    return expand_absmax(code_nested[absmax_q8[block]], absmax2[block / nested_blocksize], offset);
}

extern "C" __global__ void dequant_4bit(const unsigned char* __restrict__ packed,
                                        const float* __restrict__ absmax,
                                        const unsigned char* __restrict__ absmax_q8,
                                        const float* __restrict__ code2,
                                        const float* __restrict__ absmax2,
                                        float offset, int nested_blocksize,
                                        const float* __restrict__ code16,
                                        T* __restrict__ out, long long numel, int blocksize) {
    wait_for_prior_grids();
    __shared__ float code[16];
    __shared__ float code_nested[256];
    load_code_tables(code16, code2, absmax_q8 != nullptr, code, code_nested);
    long long byte = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long first = byte * 2;
    if (first >= numel) return;
    unsigned char b = packed[byte];
    for (int half = 0; half < 2; half++) {
        long long i = first + half;
        if (i >= numel) break;
        long long block = i / blocksize;
        float scale = block_absmax(block, absmax, absmax_q8, code_nested, absmax2, offset, nested_blocksize);
        int q = half == 0 ? (b >> 4) : (b & 15);
        st(&out[i], __fmul_rn(code[q], scale));
    }
}

// Eight values (four packed bytes) per thread, one absmax lookup and vector stores: for tensors
// whose element count is a multiple of 8 (every block size is).
__device__ __forceinline__ void store8(float* out, const float* v) {
    reinterpret_cast<float4*>(out)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(out)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* out, const float* v) {
    union { __nv_bfloat162 h[4]; uint4 u; } pack;
    for (int j = 0; j < 4; j++) pack.h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
    *reinterpret_cast<uint4*>(out) = pack.u;
}

extern "C" __global__ void dequant_4bit_x8(const unsigned int* __restrict__ packed,
                                           const float* __restrict__ absmax,
                                           const unsigned char* __restrict__ absmax_q8,
                                           const float* __restrict__ code2,
                                           const float* __restrict__ absmax2,
                                           float offset, int nested_shift,
                                           const float* __restrict__ code16,
                                           T* __restrict__ out, long long groups, int block_shift) {
    wait_for_prior_grids();
    __shared__ float code[16];
    __shared__ float code_nested[256];
    load_code_tables(code16, code2, absmax_q8 != nullptr, code, code_nested);
    // Grid-stride: a bounded grid loads the code tables once per block, not once per 256 groups.
    // Block sizes are powers of two here (shifts, not the 64-bit divisions of dequant_4bit).
    for (long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x; g < groups;
         g += (long long)gridDim.x * blockDim.x) {
        long long first = g * 8;
        long long block = first >> block_shift;
        float scale = absmax_q8 == nullptr
                          ? absmax[block]
                          : expand_absmax(code_nested[absmax_q8[block]], absmax2[block >> nested_shift], offset);
        unsigned int word = packed[g];
        float v[8];
        for (int j = 0; j < 4; j++) {
            unsigned int b = (word >> (8 * j)) & 0xffu;
            v[2 * j] = __fmul_rn(code[b >> 4], scale);
            v[2 * j + 1] = __fmul_rn(code[b & 15u], scale);
        }
        store8(out + first, v);
    }
}
