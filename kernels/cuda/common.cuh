// Shared by every kernel file. The host compiles the sources once per activation type:
// QLORA_T is `float` (the exact check mode) or `__nv_bfloat16` (training).
#include <cuda_bf16.h>

typedef QLORA_T T;

// Programmatic dependent launch (sm_90 and newer): the host launches every kernel of this module
// allowed to start before the kernel ahead of it on the stream has finished, so that its launch,
// its blocks' placement and whatever it does before reading another kernel's output overlap the
// tail of that kernel (in a decoding step, ~270 short kernels in a row). So every kernel first
// waits for the grids before it to finish and their writes to be visible (it writes nothing
// before), then lets the kernel after it launch: the wait comes first so that a kernel which
// completes implies its predecessors completed (a later kernel may read what any of them wrote),
// and at most one grid waits at a time. Before sm_90 the host launches in order and this is
// nothing.
__device__ __forceinline__ void wait_for_prior_grids() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// NVRTC has no <math.h>: +inf by its bits.
#define QLORA_INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float ld(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// BLOOM's tanh GELU, operation for operation as bloom_gelu_forward.
__device__ __forceinline__ float gelu_tanh(float x) {
    float inner = (x * 0.79788456f) * (x * 0.044715f * x + 1.0f);
    return (x * 0.5f) * (tanhf(inner) + 1.0f);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (blockDim.x >> 5) ? partial[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

__device__ float block_max(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (blockDim.x >> 5) ? partial[lane] : -QLORA_INFINITY;
        s = warp_max(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// A uniform number in [0, 1) from (seed, index): a counter-based hash (splitmix64), so the
// backward pass regenerates the forward pass's dropout mask instead of storing it.
__device__ __forceinline__ float uniform_hash(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

// Element-wise kernels give each thread a pack of PACK consecutive values: whole, 16-byte
// aligned packs move with vector accesses (scalar 2-byte accesses leave HBM half idle), the
// ragged end and misaligned views element by element. Values travel as f32, so a bf16 pack
// round-trips exactly.
#define PACK 8

// The first index of this thread's pack.
__device__ __forceinline__ long long pack_start() {
    return ((long long)blockIdx.x * blockDim.x + threadIdx.x) * PACK;
}

__device__ __forceinline__ bool pack_whole(const void* p, long long i, long long n) {
    return i + PACK <= n && ((unsigned long long)p & 15ull) == 0;
}

// PACK (8) values from p (16-byte aligned) as f32: one 16-byte load, each bf16 widened by a
// shift or a mask (no alignment test, no element-by-element fallback: the caller guarantees
// the alignment, as gemv_4bit_wide's and attention_cached's do).
__device__ __forceinline__ void load8_aligned(const float* p, float* v) {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
// The 8 bf16 values of 16 bytes `u` as f32, each widened by a shift or a mask.
__device__ __forceinline__ void unpack8_bf16(uint4 u, float* v) {
    unsigned int parts[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        v[2 * k] = __uint_as_float(parts[k] << 16);
        v[2 * k + 1] = __uint_as_float(parts[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ void load8_aligned(const __nv_bfloat16* p, float* v) {
    unpack8_bf16(__ldg(reinterpret_cast<const uint4*>(p)), v);
}

// Values p[i .. i + PACK) below n (0 beyond).
__device__ __forceinline__ void load_pack(const float* p, long long i, long long n, float* v) {
    if (pack_whole(p + i, i, n)) {
        load8_aligned(p + i, v);
        return;
    }
    for (int k = 0; k < PACK; k++) v[k] = i + k < n ? p[i + k] : 0.0f;
}
__device__ __forceinline__ void load_pack(const __nv_bfloat16* p, long long i, long long n, float* v) {
    if (pack_whole(p + i, i, n)) {
        uint4 u = *reinterpret_cast<const uint4*>(p + i);
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
        for (int k = 0; k < PACK / 2; k++) {
            float2 f = __bfloat1622float2(h[k]);
            v[2 * k] = f.x; v[2 * k + 1] = f.y;
        }
        return;
    }
    for (int k = 0; k < PACK; k++) v[k] = i + k < n ? __bfloat162float(p[i + k]) : 0.0f;
}

// p[i .. i + PACK) = v, below n.
__device__ __forceinline__ void store_pack(float* p, long long i, long long n, const float* v) {
    if (pack_whole(p + i, i, n)) {
        reinterpret_cast<float4*>(p + i)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(p + i)[1] = make_float4(v[4], v[5], v[6], v[7]);
        return;
    }
    for (int k = 0; k < PACK; k++) if (i + k < n) p[i + k] = v[k];
}
__device__ __forceinline__ void store_pack(__nv_bfloat16* p, long long i, long long n, const float* v) {
    if (pack_whole(p + i, i, n)) {
        uint4 u;
        __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
        for (int k = 0; k < PACK / 2; k++) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
        *reinterpret_cast<uint4*>(p + i) = u;
        return;
    }
    for (int k = 0; k < PACK; k++) if (i + k < n) p[i + k] = __float2bfloat16_rn(v[k]);
}
