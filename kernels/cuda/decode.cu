// Generation kernels: the fused 4-bit GEMV of decoding (a few token rows against a packed
// weight, read once), attention of new queries over the KV cache, appending to the cache, and
// the greedy choice (repetition penalty, argmax) on the device.

// y[r, o] = act(sum_i x[r, i] * W[o, i] (+ bias[o])) (+ residual[r, o]) for r < rows <= R, W
// bitsandbytes 4-bit [out, in], act BLOOM's GELU when `gelu` (else none): a decoding step's
// residual additions and activation ride on the product instead of taking launches of their own.
// One warp per output feature (grid-stride); each lane reads 16 bytes (32 codes) at a time. The
// caller guarantees in % 32 == 0 and blocksize % 32 == 0, so those 32 codes share one absmax and
// a weight row starts 16-byte aligned. The codes of a chunk are summed against x first and scaled
// by the block's absmax once (the dequantized weight is never formed). Each lane reads its rows'
// x from L1 once per chunk, so the cost grows with the rows: beyond four, dequantization and a
// tensor-core GEMM are faster. R is a compile-time bound so that the accumulators stay in
// registers. Two kernels compute the same sums in the same order (so the same bits):
// gemv_4bit_R keeps one chunk in flight per lane and finds each chunk's absmax with 64-bit
// divisions; gemv_4bit_wide_R (power-of-two block sizes, fewer than 2^31 weights, x 16-byte
// aligned) issues the loads of four chunks per lane, codes and absmax, before using any, finds
// the absmax with shifts, and spends fewer instructions per code (gemv_chunk_lean). `qlora
// bench generate` measures one against the other.

// acc[r] += scale * sum_k W[chunk c][k] * x[r, 32 c + k] for the 32 codes of `word`.
template <int R>
__device__ __forceinline__ void gemv_chunk(uint4 word, float scale, const float* code, const T* __restrict__ x,
                                           int rows, int in_features, int c, float* acc) {
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

// gemv_chunk with fewer instructions per code, for gemv_4bit_wide: x read with load8_aligned,
// and each code's table entry found from a byte offset: the word's low and high nibbles are
// moved to byte offsets (x4) four at a time, and a byte permute picks one (two instructions per
// code before the look-up instead of three to five). The same products in the same order.
template <int R>
__device__ __forceinline__ void gemv_chunk_lean(uint4 word, float scale, const float* code, const T* __restrict__ x,
                                                int rows, int in_features, int c, float* acc) {
    const char* table = reinterpret_cast<const char*>(code);
    float w[32];
    unsigned int parts[4] = {word.x, word.y, word.z, word.w};
#pragma unroll
    for (int p = 0; p < 4; p++) {
        // Byte j of the word holds element 2j in its high nibble and 2j + 1 in its low one.
        unsigned int high = (parts[p] >> 2) & 0x3c3c3c3cu, low = (parts[p] << 2) & 0x3c3c3c3cu;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            w[8 * p + 2 * j] = *reinterpret_cast<const float*>(table + __byte_perm(high, 0u, 0x4440u + j));
            w[8 * p + 2 * j + 1] = *reinterpret_cast<const float*>(table + __byte_perm(low, 0u, 0x4440u + j));
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (r < rows) {
            const T* xr = x + (long long)r * in_features + 32LL * c;
            float dot = 0.0f;
#pragma unroll
            for (int p = 0; p < 4; p++) {
                float v[8];
                load8_aligned(xr + 8 * p, v);
#pragma unroll
                for (int k = 0; k < 8; k++) dot = fmaf(w[8 * p + k], v[k], dot);
            }
            acc[r] = fmaf(dot, scale, acc[r]);
        }
    }
}

// The warp's sums into y[:, o] with the bias and the epilogue.
template <int R>
__device__ __forceinline__ void gemv_store(float* acc, int lane, const T* __restrict__ bias,
                                           const T* __restrict__ residual, int gelu, T* __restrict__ y,
                                           int rows, int out_features, int o) {
    float b = bias != nullptr ? ld(bias[o]) : 0.0f;
#pragma unroll
    for (int r = 0; r < R; r++) {
        float v = warp_sum(acc[r]) + b;
        if (lane == 0 && r < rows) {
            long long at = (long long)r * out_features + o;
            if (gelu) v = gelu_tanh(v);
            if (residual != nullptr) v += ld(residual[at]);
            st(&y[at], v);
        }
    }
}

template <int R>
__device__ void gemv_4bit(const uint4* __restrict__ packed, const float* __restrict__ absmax,
                          const unsigned char* __restrict__ absmax_q8, const float* __restrict__ code2,
                          const float* __restrict__ absmax2, float offset, int nested_blocksize,
                          const float* __restrict__ code16, int blocksize, const T* __restrict__ x,
                          const T* __restrict__ bias, const T* __restrict__ residual, int gelu,
                          T* __restrict__ y, int rows, int in_features, int out_features) {
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
            gemv_chunk<R>(word, scale, code, x, rows, in_features, c, acc);
        }
        gemv_store<R>(acc, lane, bias, residual, gelu, y, rows, out_features, o);
    }
}

// Chunks per lane whose loads gemv_4bit_wide issues together.
#define GEMV_WIDE_CHUNKS 4

// One lane's share of a group: the codes of GEMV_WIDE_CHUNKS chunks (32 apart) of a row and their
// absmax (or 8-bit absmax code and nested absmax), loaded before any is used.
struct GemvGroup {
    uint4 word[GEMV_WIDE_CHUNKS];
    unsigned char q[GEMV_WIDE_CHUNKS];
    float a[GEMV_WIDE_CHUNKS];
};

__device__ __forceinline__ void gemv_load_group(GemvGroup& g, const uint4* __restrict__ packed,
                                                const float* __restrict__ absmax,
                                                const unsigned char* __restrict__ absmax_q8,
                                                const float* __restrict__ absmax2, int nested_shift,
                                                int block_shift, int in_features, int o, int base) {
    int chunks = in_features / 32;
    const uint4* w_row = packed + (long long)o * chunks;
    unsigned int row_first = (unsigned int)o * (unsigned int)in_features;
#pragma unroll
    for (int u = 0; u < GEMV_WIDE_CHUNKS; u++) {
        int c = base + 32 * u;
        g.word[u] = c < chunks ? __ldg(w_row + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < GEMV_WIDE_CHUNKS; u++) {
        int c = base + 32 * u;
        unsigned int block = c < chunks ? (row_first + 32u * (unsigned int)c) >> block_shift : 0u;
        if (absmax_q8 != nullptr) {
            g.q[u] = c < chunks ? __ldg(absmax_q8 + block) : 0;
            g.a[u] = c < chunks ? __ldg(absmax2 + (block >> nested_shift)) : 0.0f;
        } else {
            g.q[u] = 0;
            g.a[u] = c < chunks ? __ldg(absmax + block) : 0.0f;
        }
    }
}

// Each warp walks its output rows (grid-stride over a grid of a few blocks per SM) one group at
// a time and loads the next group, of this row or the next, before computing the current one, so
// its loads are always in flight; the first group is requested before the block loads its code
// tables and waits at the barrier.
template <int R>
__device__ void gemv_4bit_wide(const uint4* __restrict__ packed, const float* __restrict__ absmax,
                               const unsigned char* __restrict__ absmax_q8, const float* __restrict__ code2,
                               const float* __restrict__ absmax2, float offset, int nested_shift,
                               const float* __restrict__ code16, int block_shift, const T* __restrict__ x,
                               const T* __restrict__ bias, const T* __restrict__ residual, int gelu,
                               T* __restrict__ y, int rows, int in_features, int out_features) {
    __shared__ float code[16];
    __shared__ float code_nested[256];
    int lane = threadIdx.x & 31;
    int warps = blockDim.x / 32;
    int stride = gridDim.x * warps;
    int chunks = in_features / 32;
    int o = blockIdx.x * warps + threadIdx.x / 32;
    GemvGroup next;
    if (o < out_features)
        gemv_load_group(next, packed, absmax, absmax_q8, absmax2, nested_shift, block_shift, in_features, o, lane);
    load_code_tables(code16, code2, absmax_q8 != nullptr, code, code_nested);
    for (; o < out_features; o += stride) {
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = 0.0f;
        for (int base = lane; base < chunks; base += 32 * GEMV_WIDE_CHUNKS) {
            GemvGroup cur = next;
            int next_base = base + 32 * GEMV_WIDE_CHUNKS, next_o = o;
            if (next_base >= chunks) {
                next_base = lane;
                next_o = o + stride;
            }
            if (next_o < out_features)
                gemv_load_group(next, packed, absmax, absmax_q8, absmax2, nested_shift, block_shift, in_features,
                                next_o, next_base);
#pragma unroll
            for (int u = 0; u < GEMV_WIDE_CHUNKS; u++) {
                int c = base + 32 * u;
                if (c < chunks) {
                    float scale = absmax_q8 != nullptr ? expand_absmax(code_nested[cur.q[u]], cur.a[u], offset)
                                                       : cur.a[u];
                    gemv_chunk_lean<R>(cur.word[u], scale, code, x, rows, in_features, c, acc);
                }
            }
        }
        gemv_store<R>(acc, lane, bias, residual, gelu, y, rows, out_features, o);
    }
}

#define GEMV_4BIT(R)                                                                                      \
    extern "C" __global__ void gemv_4bit_##R(                                                             \
        const uint4* packed, const float* absmax, const unsigned char* absmax_q8, const float* code2,      \
        const float* absmax2, float offset, int nested_blocksize, const float* code16, int blocksize,      \
        const T* x, const T* bias, const T* residual, int gelu, T* y, int rows, int in_features,           \
        int out_features) {                                                                               \
        wait_for_prior_grids();                                                                           \
        gemv_4bit<R>(packed, absmax, absmax_q8, code2, absmax2, offset, nested_blocksize, code16, blocksize, \
                     x, bias, residual, gelu, y, rows, in_features, out_features);                        \
    }                                                                                                     \
    extern "C" __global__ void gemv_4bit_wide_##R(                                                        \
        const uint4* packed, const float* absmax, const unsigned char* absmax_q8, const float* code2,      \
        const float* absmax2, float offset, int nested_shift, const float* code16, int block_shift,        \
        const T* x, const T* bias, const T* residual, int gelu, T* y, int rows, int in_features,           \
        int out_features) {                                                                               \
        wait_for_prior_grids();                                                                           \
        gemv_4bit_wide<R>(packed, absmax, absmax_q8, code2, absmax2, offset, nested_shift, code16,          \
                          block_shift, x, bias, residual, gelu, y, rows, in_features, out_features);      \
    }
GEMV_4BIT(1)
GEMV_4BIT(2)
GEMV_4BIT(4)

// The 4-bit GEMV of bf16 decoding on tensor cores: y[r, o] for r < rows <= 8 as gemv_4bit, through
// mma.m16n8k16 (bf16 operands, f32 sums). A block takes 16 output features (the mma's M) for up to
// 8 token rows (its N); its sixteen warps take interleaved 128-wide steps of the input and meet in
// shared memory. Each weight is dequantized as bitsandbytes' own batch-1 kernel
// (kgemm_4bit_inference_naive) does in bf16: bf16(code) * bf16(absmax), rounded to bf16; the
// products and their sums are then exact in f32 (bitsandbytes rounds each product to bf16 too).
//
// Lane (g, c) = (lane / 4, lane % 4) of a warp step at k0 loads the 32 codes [k0 + 32c, + 32) of
// features g and g + 8 (16 bytes each, one absmax each: block sizes are powers of two, at least
// 32) and, when g < rows, x[g][k0 + 32c, + 32). A dot product does not care in which order its
// terms meet, so mma i of the step gives the k slots {2c, 2c+1, 2c+8, 2c+9} the inputs k0 + 32c +
// 4i + {0, 1, 2, 3}: then byte 2i of a lane's codes is its A register for slots 2c, 2c+1 (the
// high nibble is the first element), byte 2i + 1 the one for slots 2c+8, 2c+9, and the B
// registers are words 2i and 2i + 1 of x as loaded. A byte becomes its two bf16 codes through a
// 256-entry pair table in shared memory stored once per lane (entry b of lane l at
// pairs[b * 32 + l]), so that a warp's look-ups never share a bank; the blocks are persistent
// (one wave, grid-stride over the tiles of 16 features) so each fills its table once.
//
// What bounds it (Nsight Compute on an H100, and timings with each part taken out): neither
// the schedulers nor the memory alone but the L1's data path, which carries the look-ups, the
// weight's loads and x's (a 16-byte load of all 32 lanes is four passes even when 28 lanes read
// what 4 others do). So a step is kept to the look-ups and what they need (~205 instructions,
// 128 of them the look-ups; the first version issued 357): lanes past the token rows load no x
// (predicated loads: their registers stay zero and their sums are never stored), features past
// the last re-read the last, steps past the input re-read the last step with a zero scale, the
// weight's loads are never skipped (a branch would make the compiler copy the next step's
// registers into the current ones), a lane's codes are found by their 16-byte chunk index (one
// number per feature, its absmax block a shift of it), the plain and double-quantized absmax are
// two kernels, and the latter skips bitsandbytes' flush of denormal products (the offset added
// to them is never that small, so the sum rounds the same). The weight is loaded a step ahead
// into registers (x, from L1 or L2, in its step), 64 registers a lane: two blocks of sixteen
// warps an SM. (Copying the steps into shared memory with cp.async instead, two steps ahead,
// measured ~25% slower: it adds the copies' writes and reads to the same data path.)
#define GEMV_TC_WARPS 16

// 16 bytes of a weight that a GEMV reads once: not kept in L1, where they would only push out
// what is read again (x, the absmax), and fetched into L2 256 bytes at a time (the next warps of
// a tensor-core GEMV block read the rest of those bytes). Measured on an H100: a decoding step
// 2.94 -> 2.89 ms with both (bench/generate/README.md, "2026-12-06, second session").
__device__ __forceinline__ uint4 ld_streamed(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// One lane's loads of a warp step from the weight: the codes of its two features and their
// absmax (plain, or the 8-bit code and the nested absmax).
struct GemvTcStep {
    uint4 w[2];
    float a[2];
    unsigned int q[2];
};

// The 16-byte chunk index of lane (g, c)'s codes of feature `g + 8h` at step 0 of `tile` (a
// feature past the last reads the last: its sums are never stored). Chunk i holds codes
// [32i, 32i + 32) of the flattened weight, so its block is i >> (block_shift - 5).
__device__ __forceinline__ unsigned int gemv_tc_chunk(int tile, int h, int g, int c, int in_features,
                                                      int out_features) {
    int f = min(tile * 16 + g + 8 * h, out_features - 1);
    return (unsigned int)f * (unsigned int)(in_features / 32) + (unsigned int)c;
}

// x[0 .. 4) = 32 values at p as bf16 packs when `load` (else unchanged). In bf16, predicated
// loads: a branch around them costs instructions, and lanes that load nothing cost the cache
// nothing. (The f32 kernels, compiled alongside, never take the tensor-core GEMV: a plain
// branch and conversion.)
__device__ __forceinline__ void load_x_bf16_if(bool load, const __nv_bfloat16* p, uint4* x) {
#pragma unroll
    for (int u = 0; u < 4; u++)
        asm volatile(
            "{ .reg .pred p; setp.ne.b32 p, %5, 0; @p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4]; }\n"
            : "+r"(x[u].x), "+r"(x[u].y), "+r"(x[u].z), "+r"(x[u].w)
            : "l"(reinterpret_cast<const uint4*>(p) + u), "r"((int)load));
}
__device__ __forceinline__ void load_x_bf16_if(bool load, const float* p, uint4* x) {
    if (!load) return;
    unsigned int w[16];
#pragma unroll
    for (int u = 0; u < 16; u++) {
        __nv_bfloat162 h = __floats2bfloat162_rn(p[2 * u], p[2 * u + 1]);
        w[u] = *reinterpret_cast<unsigned int*>(&h);
    }
#pragma unroll
    for (int u = 0; u < 4; u++) x[u] = make_uint4(w[4 * u], w[4 * u + 1], w[4 * u + 2], w[4 * u + 3]);
}

// The 8-bit absmax codes of a double-quantized weight in the order the tensor-core GEMV's warps
// read them: for tile t (16 features) and step s (128 inputs), 32 bytes, byte 2r + half the code
// of the block that holds codes [128s + 64 half, +64) of feature 16t + r (features past the last
// repeat the last). A warp's two loads of a step then fall in one 32-byte sector, where the
// stored order puts the 16 features' codes in as many cache lines (a row of blocks apart) and the
// L1's data path, which bounds the GEMV, serves each line separately. Needs block sizes of at
// least 64 (a lane pair's 64 codes in one block). Made once by absmax_q8_by_step.
__device__ __forceinline__ unsigned int gemv_tc_q8_at(int tile, int step, int steps, int g, int c) {
    return ((unsigned int)(tile * steps + step) * 16u + (unsigned int)g) * 2u + (unsigned int)(c >> 1);
}

extern "C" __global__ void absmax_q8_by_step(const unsigned char* __restrict__ absmax_q8,
                                             unsigned char* __restrict__ by_step, int out_features,
                                             int in_features, int block_shift) {
    wait_for_prior_grids();
    int steps = in_features / 128;
    long long n = (long long)((out_features + 15) / 16) * steps * 32;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long ts = i >> 5;
        int r = (int)(i >> 1) & 15, half = (int)i & 1;
        long long f = min((ts / steps) * 16 + r, (long long)out_features - 1);
        long long code = f * in_features + (ts % steps) * 128 + 64 * half;
        by_step[i] = absmax_q8[code >> block_shift];
    }
}

// A LoRA adapter's term in the tensor-core GEMV's epilogue, before its activation and residual:
// y[row, o] += scale * xa[row] . b[o] (xa [rows, r] f32 from lora_down, b [out, r]). Passed by
// value (the host's LoraTermArg has this layout) to the GEMV's `_lora` kernels only: the
// adapter-free ones are compiled without it (a runtime test of r in the epilogue alone measured
// +0.08 ms a decoding step).
struct GemvLora {
    const float* xa;
    const T* b;
    int r;
    float scale;
};

// xa [rows, r] = x [rows, in] a^T (a [r, in]) in f32: the LoRA branch's first product, for the
// GEMV's epilogue. One block per (k, row); each thread's loads of x and a go out together.
extern "C" __global__ void lora_down(const T* __restrict__ x, const T* __restrict__ a, float* __restrict__ xa,
                                     int r, int in_features) {
    wait_for_prior_grids();
    int k = blockIdx.x, row = blockIdx.y;
    const T* xr = x + (long long)row * in_features;
    const T* ak = a + (long long)k * in_features;
    float sum = 0.0f;
    for (int i = threadIdx.x * PACK; i < in_features; i += blockDim.x * PACK) {
        float xv[PACK], av[PACK];
        load_pack(xr, i, in_features, xv);
        load_pack(ak, i, in_features, av);
#pragma unroll
        for (int u = 0; u < PACK; u++) sum = fmaf(xv[u], av[u], sum);
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) xa[(long long)row * r + k] = sum;
}

// The weight's part of a step at chunk[h] (codes and absmax): loaded before the kernel ahead
// has finished.
template <bool DQ>
__device__ __forceinline__ void gemv_tc_load_weight(GemvTcStep& st, const unsigned int* chunk, unsigned int q_at,
                                                    const uint4* __restrict__ packed,
                                                    const float* __restrict__ absmax,
                                                    const unsigned char* __restrict__ q8_by_step,
                                                    const float* __restrict__ absmax2, int nested_shift,
                                                    int chunk_shift) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        st.w[h] = ld_streamed(packed + chunk[h]);
        unsigned int block = chunk[h] >> chunk_shift;
        if (DQ) {
            st.q[h] = __ldg(q8_by_step + q_at + 16 * h);
            st.a[h] = __ldg(absmax2 + (block >> nested_shift));
        } else {
            st.a[h] = __ldg(absmax + block);
        }
    }
}

// d += A B for one m16n8k16 tile (A row-major 16 x 16, B column-major 16 x 8, bf16; d f32).
__device__ __forceinline__ void mma_bf16_16816(float* d, unsigned int a0, unsigned int a1, unsigned int a2,
                                               unsigned int a3, unsigned int b0, unsigned int b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // the host launches this kernel on sm_80 and newer only
#endif
}

// The pair of bf16 codes of byte `bit / 8` of `word`, scaled, from this lane's copy in the
// table: the byte moved to bits 7..14 (its entry's offset, byte * 128) by one shift, and the
// lane's offset (4 * lane) or-ed in.
__device__ __forceinline__ unsigned int gemv_tc_pair(const char* table, unsigned int word, int bit,
                                                     unsigned int lane_offset, __nv_bfloat162 scale) {
    unsigned int moved = bit < 7 ? word << (7 - bit) : word >> (bit - 7);
    unsigned int u = *reinterpret_cast<const unsigned int*>(table + ((moved & 0x7f80u) | lane_offset));
    __nv_bfloat162 v = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&u), scale);
    return *reinterpret_cast<unsigned int*>(&v);
}

// acc += the step's 16 features x 128 inputs times its token rows.
__device__ __forceinline__ void gemv_tc_step(float (&acc)[2][4], const GemvTcStep& st, const uint4 (&x)[4],
                                             const char* pairs, unsigned int lane_offset, __nv_bfloat162 scale0,
                                             __nv_bfloat162 scale1) {
    unsigned int w0[4] = {st.w[0].x, st.w[0].y, st.w[0].z, st.w[0].w};
    unsigned int w1[4] = {st.w[1].x, st.w[1].y, st.w[1].z, st.w[1].w};
    unsigned int xw[16] = {x[0].x, x[0].y, x[0].z, x[0].w, x[1].x, x[1].y, x[1].z, x[1].w,
                           x[2].x, x[2].y, x[2].z, x[2].w, x[3].x, x[3].y, x[3].z, x[3].w};
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int low = 16 * (i & 1);  // the bit where byte 2i starts in its word
        unsigned int a0 = gemv_tc_pair(pairs, w0[i >> 1], low, lane_offset, scale0);
        unsigned int a1 = gemv_tc_pair(pairs, w1[i >> 1], low, lane_offset, scale1);
        unsigned int a2 = gemv_tc_pair(pairs, w0[i >> 1], low + 8, lane_offset, scale0);
        unsigned int a3 = gemv_tc_pair(pairs, w1[i >> 1], low + 8, lane_offset, scale1);
        mma_bf16_16816(acc[i & 1], a0, a1, a2, a3, xw[2 * i], xw[2 * i + 1]);
    }
}

template <bool DQ, bool LORA>
__device__ __forceinline__ void gemv_4bit_tc(const uint4* __restrict__ packed, const float* __restrict__ absmax,
                                             const unsigned char* __restrict__ absmax_q8,
                                             const float* __restrict__ code2, const float* __restrict__ absmax2,
                                             float offset, int nested_shift, const float* __restrict__ code16,
                                             int block_shift, const T* __restrict__ x, const T* __restrict__ bias,
                                             const T* __restrict__ residual, int gelu, T* __restrict__ y, int rows,
                                             int in_features, int out_features, GemvLora lora) {
    __shared__ __align__(16) unsigned int pairs[256 * 32];
    __shared__ float code_nested[256];
    __shared__ float sums[GEMV_TC_WARPS][16 * 8];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int g = lane >> 2, c = lane & 3;
    int steps = in_features / 128;
    int per_warp = (steps + GEMV_TC_WARPS - 1) / GEMV_TC_WARPS;
    int tiles = (out_features + 15) / 16;
    int tile = blockIdx.x;
    int chunk_shift = block_shift - 5;
    // Chunks of features g and g + 8 at step 0 of this tile and of the block's next one.
    unsigned int here[2], after[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        here[h] = gemv_tc_chunk(tile, h, g, c, in_features, out_features);
        after[h] = gemv_tc_chunk(min(tile + (int)gridDim.x, tiles - 1), h, g, c, in_features, out_features);
    }
    const T* xl = x + (long long)g * in_features + 32 * c;
    // Each entry once, in the space the warps' sums take later.
    unsigned int* pair_once = reinterpret_cast<unsigned int*>(&sums[0][0]);
    // The first step's weight loads go out before the tables are filled, and both before the
    // kernel ahead (which writes x) has finished.
    GemvTcStep cur;
    int first = min(warp, steps - 1);
    if (tile < tiles) {
        unsigned int chunk[2] = {here[0] + 4 * first, here[1] + 4 * first};
        gemv_tc_load_weight<DQ>(cur, chunk, gemv_tc_q8_at(tile, first, steps, g, c), packed, absmax, absmax_q8,
                                absmax2, nested_shift, chunk_shift);
    }
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        __nv_bfloat162 v = __floats2bfloat162_rn(code16[i >> 4], code16[i & 15]);
        pair_once[i] = *reinterpret_cast<unsigned int*>(&v);
        if (DQ) code_nested[i] = ftz(code2[i]);
    }
    __syncthreads();
    // Consecutive threads store consecutive 16 bytes (four lanes' copies of one entry).
    for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) {
        unsigned int v = pair_once[i >> 3];
        reinterpret_cast<uint4*>(pairs)[i] = make_uint4(v, v, v, v);
    }
    __syncthreads();
    wait_for_prior_grids();
    const char* table = reinterpret_cast<const char*>(pairs);
    unsigned int lane_offset = 4u * lane;
    for (; tile < tiles; tile += gridDim.x) {
        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll 2
        for (int j = 0; j < per_warp; j++) {
            // The next step's loads (of this tile, or the next tile's first: after the last
            // tile that re-reads this one's) before this step's arithmetic.
            GemvTcStep next;
            bool more = j + 1 < per_warp;
            int s = min(more ? warp + GEMV_TC_WARPS * (j + 1) : warp, steps - 1);
            unsigned int chunk[2] = {(more ? here[0] : after[0]) + 4 * s, (more ? here[1] : after[1]) + 4 * s};
            int next_tile = more ? tile : min(tile + (int)gridDim.x, tiles - 1);
            gemv_tc_load_weight<DQ>(next, chunk, gemv_tc_q8_at(next_tile, s, steps, g, c), packed, absmax, absmax_q8,
                                    absmax2, nested_shift, chunk_shift);
            // This step's inputs (from L1 or L2; the many warps of an SM cover their latency).
            // Lanes past the token rows keep zeros (their sums are never stored) and load nothing.
            uint4 xs[4] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0),
                           make_uint4(0, 0, 0, 0)};
            load_x_bf16_if(g < rows, xl + 128 * min(warp + GEMV_TC_WARPS * j, steps - 1), xs);
            float a0 = DQ ? __fadd_rn(__fmul_rn(code_nested[cur.q[0]], cur.a[0]), offset) : cur.a[0];
            float a1 = DQ ? __fadd_rn(__fmul_rn(code_nested[cur.q[1]], cur.a[1]), offset) : cur.a[1];
            // A step past the input re-read the last one: it adds nothing.
            bool live = warp + GEMV_TC_WARPS * j < steps;
            gemv_tc_step(acc, cur, xs, table, lane_offset, __float2bfloat162_rn(live ? a0 : 0.0f),
                         __float2bfloat162_rn(live ? a1 : 0.0f));
            cur = next;
        }
        // Lane (g, c) holds features g, g + 8 for token rows 2c, 2c + 1.
        float* mine = sums[warp];
        mine[g * 8 + 2 * c] = acc[0][0] + acc[1][0];
        mine[g * 8 + 2 * c + 1] = acc[0][1] + acc[1][1];
        mine[(g + 8) * 8 + 2 * c] = acc[0][2] + acc[1][2];
        mine[(g + 8) * 8 + 2 * c + 1] = acc[0][3] + acc[1][3];
        __syncthreads();
        if (threadIdx.x < 128) {
            int f = threadIdx.x >> 3, r = threadIdx.x & 7, o = tile * 16 + f;
            if (r < rows && o < out_features) {
                float v = 0.0f;
#pragma unroll
                for (int w = 0; w < GEMV_TC_WARPS; w++) v += sums[w][f * 8 + r];
                if (bias != nullptr) v += ld(bias[o]);
                if (LORA) {
                    float t = 0.0f;
                    for (int k = 0; k < lora.r; k++)
                        t = fmaf(lora.xa[r * lora.r + k], ld(lora.b[(long long)o * lora.r + k]), t);
                    v += lora.scale * t;
                }
                long long at = (long long)r * out_features + o;
                if (gelu) v = gelu_tanh(v);
                if (residual != nullptr) v += ld(residual[at]);
                st(&y[at], v);
            }
        }
        __syncthreads();
#pragma unroll
        for (int h = 0; h < 2; h++) {
            here[h] = after[h];
            after[h] = gemv_tc_chunk(min(tile + 2 * (int)gridDim.x, tiles - 1), h, g, c, in_features, out_features);
        }
    }
}

// The weight's absmax stored (gemv_4bit_tc) or double-quantized (gemv_4bit_tc_dq: `absmax_q8` is
// then the codes in step order, from absmax_q8_by_step); `_lora`: with an adapter's term.
#define GEMV_4BIT_TC_PARAMS                                                                               \
    const uint4 *packed, const float *absmax, const unsigned char *absmax_q8, const float *code2,          \
        const float *absmax2, float offset, int nested_shift, const float *code16, int block_shift,        \
        const T *x, const T *bias, const T *residual, int gelu, T *y, int rows, int in_features,           \
        int out_features
#define GEMV_4BIT_TC_ARGS                                                                                 \
    packed, absmax, absmax_q8, code2, absmax2, offset, nested_shift, code16, block_shift, x, bias, residual, \
        gelu, y, rows, in_features, out_features
#define GEMV_4BIT_TC(NAME, DQ)                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_TC_WARPS, 2) NAME(GEMV_4BIT_TC_PARAMS) {       \
        gemv_4bit_tc<DQ, false>(GEMV_4BIT_TC_ARGS, GemvLora{nullptr, nullptr, 0, 0.0f});                  \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_TC_WARPS, 2)                                   \
        NAME##_lora(GEMV_4BIT_TC_PARAMS, GemvLora lora) {                                                 \
        gemv_4bit_tc<DQ, true>(GEMV_4BIT_TC_ARGS, lora);                                                  \
    }
GEMV_4BIT_TC(gemv_4bit_tc, false)
GEMV_4BIT_TC(gemv_4bit_tc_dq, true)

// The LM head of decoding: y[r, o] = sum_i x[r, i] * W[o, i] in f32 for r < rows <=
// GEMV_DENSE_ROWS, W [out, in] in T: the embedding table, 2 GB in bf16 for BLOOM's 250,880 x
// 4,096 (40% of a decoding step's bytes): 666-670 us on an H100 where cuBLAS's GEMM took 679
// (Nsight Compute, bench/generate/README.md). One warp per output feature at a time
// (grid-stride over one wave of blocks); each lane reads 16-byte words of W's row, 32 apart,
// GEMV_DENSE_LOADS of them issued before any is used, so that an SM keeps up to 128 KB in flight
// (56 registers: 32 warps an SM); x, a few KB that every warp reads, comes from L1. A warp's
// first words are requested before the kernel ahead (the final norm, which writes x) has
// finished. The host guarantees whole 16-byte words (in * sizeof(T) % 16 == 0) and 16-byte
// aligned W and x.
#define GEMV_DENSE_LOADS 8
#define GEMV_DENSE_ROWS 4

// acc + the 16 bytes `w` of a row of W (8 bf16 or 4 f32 values) times x's values at the same
// place (16-byte aligned).
__device__ __forceinline__ float dot_word(uint4 w, const __nv_bfloat16* x, float acc) {
    float wv[8], xv[8];
    unpack8_bf16(w, wv);
    load8_aligned(x, xv);
#pragma unroll
    for (int k = 0; k < 8; k++) acc = fmaf(wv[k], xv[k], acc);
    return acc;
}
__device__ __forceinline__ float dot_word(uint4 w, const float* x, float acc) {
    float4 v = __ldg(reinterpret_cast<const float4*>(x));
    acc = fmaf(__uint_as_float(w.x), v.x, acc);
    acc = fmaf(__uint_as_float(w.y), v.y, acc);
    acc = fmaf(__uint_as_float(w.z), v.z, acc);
    return fmaf(__uint_as_float(w.w), v.w, acc);
}

// Words [base + lane + 32 u) of `row` (`words` of them; zeros past the end).
__device__ __forceinline__ void gemv_dense_load(uint4 (&batch)[GEMV_DENSE_LOADS], const uint4* __restrict__ row,
                                                int base, int words) {
#pragma unroll
    for (int u = 0; u < GEMV_DENSE_LOADS; u++) {
        int j = base + 32 * u;
        batch[u] = j < words ? ld_streamed(row + j) : make_uint4(0, 0, 0, 0);
    }
}

extern "C" __global__ void gemv_dense(const T* __restrict__ w, const T* __restrict__ x, float* __restrict__ y,
                                      int rows, int in_features, int out_features) {
    const int per_word = 16 / (int)sizeof(T);
    int words = in_features / per_word;
    int lane = threadIdx.x & 31;
    int stride = gridDim.x * (blockDim.x >> 5);
    int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    uint4 batch[GEMV_DENSE_LOADS];
    if (o < out_features)
        gemv_dense_load(batch, reinterpret_cast<const uint4*>(w + (long long)o * in_features), lane, words);
    wait_for_prior_grids();
    for (; o < out_features; o += stride) {
        const uint4* row = reinterpret_cast<const uint4*>(w + (long long)o * in_features);
        float acc[GEMV_DENSE_ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int base = lane; base < words; base += 32 * GEMV_DENSE_LOADS) {
            // The row's first words were loaded ahead (before the wait, or after the last row).
            if (base != lane) gemv_dense_load(batch, row, base, words);
#pragma unroll
            for (int u = 0; u < GEMV_DENSE_LOADS; u++) {
                int j = base + 32 * u;
                if (j < words) {
#pragma unroll
                    for (int r = 0; r < GEMV_DENSE_ROWS; r++)
                        if (r < rows) acc[r] = dot_word(batch[u], x + (long long)r * in_features + j * per_word, acc[r]);
                }
            }
        }
        int next = o + stride;
        if (next < out_features)
            gemv_dense_load(batch, reinterpret_cast<const uint4*>(w + (long long)next * in_features), lane, words);
#pragma unroll
        for (int r = 0; r < GEMV_DENSE_ROWS; r++) {
            float v = warp_sum(acc[r]);
            if (lane == 0 && r < rows) y[(long long)r * out_features + o] = v;
        }
    }
}

// This step's keys and values, element (bh, t, d) of each at src[bh * head_stride + t * hd + d]
// (a packed [B * heads, T, hd] has head_stride T * hd; one token per row can be read straight
// from a projection's output, e.g. BLOOM's fused [B, heads, 3, hd] with head_stride 3 * hd) ->
// columns past .. past + T of the caches [B * heads, capacity, hd], with `past` read from the
// device (*past_len), so that one recorded decoding step (a CUDA graph) serves every position.
// Columns beyond the capacity are not written.
extern "C" __global__ void kv_append(const T* __restrict__ k_src, const T* __restrict__ v_src,
                                     T* __restrict__ k_cache, T* __restrict__ v_cache, int rows, int seq,
                                     int capacity, const int* __restrict__ past_len, int hd,
                                     long long head_stride) {
    wait_for_prior_grids();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * seq * hd) return;
    int d = i % hd;
    long long r = i / hd;
    int t = r % seq;
    long long bh = r / seq;
    int column = *past_len + t;
    if (column >= capacity) return;
    long long from = bh * head_stride + (long long)t * hd + d;
    long long to = (bh * capacity + column) * hd + d;
    k_cache[to] = k_src[from];
    v_cache[to] = v_src[from];
}

// Where query row `row` ([B, heads, T] flattened) finds its kv head in the caches
// [B, kv_heads, capacity, hd]: the element offset of that head's first column.
__device__ __forceinline__ long long cache_head_offset(long long row, int seq, int heads, int kv_heads,
                                                       int capacity, int hd) {
    long long bh = row / seq;
    int kv = (int)(bh % heads) / (heads / kv_heads);
    return ((bh / heads) * kv_heads + kv) * capacity * hd;
}

// context[row] = the mean of the first `keys` cached values: the uniform weights a query that
// sees no key gets.
__device__ void mean_of_values(const T* __restrict__ v_base, int keys, int hd, T* __restrict__ out) {
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < keys; j++) acc += ld(v_base[(long long)j * hd + d]);
        st(&out[d], acc / keys);
    }
}

// Attention of new queries q (element (bh, t, d) at q[bh * q_head_stride + t * hd + d], as in
// kv_append) over the cached keys and values [B, kv_heads, capacity, hd] (the first keys =
// *past_len + T columns filled, the last T of them this step's): context [B, heads, T, hd].
// Query t sees keys j <= keys - T + t that are real (key_mask [B, mask_stride], the first `keys`
// of each row); ALiBi adds slope[h] * positions[b, j] (same layout) when slopes != null. A row
// that sees no key gets uniform weights, as the training softmax (and transformers' eager
// attention) gives it. The number of keys is read on the device, so a recorded decoding step (a
// CUDA graph) serves every position.
//
// Block (query row, split) takes the columns [split * keys_per_split, + keys_per_split): at one
// query per row (decoding) a few dozen rows would leave most SMs idle, so the keys are split
// across blocks and each block writes its partial softmax (max, sum of exponentials, their sum
// of values: partial [rows, splits, hd + 2]) for attention_combine; with one split the block
// writes the context itself. Dynamic shared memory: the query (hd floats), the split's scores
// (keys_per_split) and the key groups' weighted sums (value_groups(hd, blockDim.x) * hd).
// Splits that start past the filled columns do nothing.
// Packs of a key row whose loads attention_cached issues together.
#define KEY_PACKS 8

extern "C" __global__ void attention_cached(const T* __restrict__ q, long long q_head_stride,
                                            const T* __restrict__ k_cache,
                                            const T* __restrict__ v_cache, T* __restrict__ context,
                                            const float* __restrict__ key_mask, const float* __restrict__ slopes,
                                            const float* __restrict__ positions, int mask_stride, int heads,
                                            int kv_heads, int seq, const int* __restrict__ past_len, int capacity,
                                            int hd, float scale, int keys_per_split, float* __restrict__ partial) {
    wait_for_prior_grids();
    extern __shared__ float shared[];
    float* q_row = shared;
    float* p = shared + hd;
    long long row = blockIdx.x;
    int t = row % seq;
    long long bh = row / seq;
    int h = bh % heads;
    long long b = bh / heads;
    long long head_at = cache_head_offset(row, seq, heads, kv_heads, capacity, hd);
    const T* k_base = k_cache + head_at;
    const T* v_base = v_cache + head_at;
    int keys = min(*past_len + seq, capacity);
    int first = blockIdx.y * keys_per_split;
    if (first >= keys) return;
    int end = min(first + keys_per_split, keys);
    // Keys after `last` are hidden from this query: neither scored nor summed.
    int last = keys - seq + t;
    int seen = min(end, last + 1);
    const float* mask = key_mask + b * mask_stride;
    const T* q_in = q + bh * q_head_stride + (long long)t * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) q_row[d] = ld(q_in[d]);
    __syncthreads();
    float slope = slopes != nullptr ? slopes[h] : 0.0f;
    // Whole 16-byte packs when every key row starts aligned: then a thread issues the loads of
    // KEY_PACKS packs before using any (a 128-wide bf16 key in one round trip to memory instead
    // of sixteen one after the other).
    bool whole_packs = hd % PACK == 0 && ((unsigned long long)k_base & 15ull) == 0;
    // One key per thread: its row read in 16-byte packs.
    for (int j = first + threadIdx.x; j < end; j += blockDim.x) {
        float score = -QLORA_INFINITY;
        if (j < seen && mask[j] != 0.0f) {
            const T* key = k_base + (long long)j * hd;
            float dot = 0.0f;
            if (whole_packs) {
                for (int d0 = 0; d0 < hd; d0 += KEY_PACKS * PACK) {
                    float v[KEY_PACKS][PACK];
#pragma unroll
                    for (int u = 0; u < KEY_PACKS; u++)
                        if (d0 + u * PACK < hd) load8_aligned(key + d0 + u * PACK, v[u]);
#pragma unroll
                    for (int u = 0; u < KEY_PACKS; u++)
                        if (d0 + u * PACK < hd)
#pragma unroll
                            for (int k = 0; k < PACK; k++) dot = fmaf(q_row[d0 + u * PACK + k], v[u][k], dot);
                }
            } else {
                for (int d = 0; d < hd; d += PACK) {
                    float v[PACK];
                    load_pack(key, d, hd, v);
#pragma unroll
                    for (int u = 0; u < PACK; u++) dot = fmaf(d + u < hd ? q_row[d + u] : 0.0f, v[u], dot);
                }
            }
            float bias = slopes != nullptr ? slope * positions[b * mask_stride + j] : 0.0f;
            score = dot * scale + bias;
        }
        p[j - first] = score;
    }
    __syncthreads();
    float mx = -QLORA_INFINITY;
    for (int j = threadIdx.x; j < end - first; j += blockDim.x) mx = fmaxf(mx, p[j]);
    mx = block_max(mx);
    bool whole = gridDim.y == 1;
    if (whole && mx == -QLORA_INFINITY) {
        // No key visible: uniform weights over every filled column.
        mean_of_values(v_base, keys, hd, context + row * hd);
        return;
    }
    float sum = 0.0f;
    for (int j = threadIdx.x; j < end - first; j += blockDim.x) {
        float e = p[j] == -QLORA_INFINITY ? 0.0f : expf(p[j] - mx);
        p[j] = e;
        sum += e;
    }
    sum = block_sum(sum);
    // The weighted values: thread (group g, pack k) sums columns [k * PACK, + PACK) over keys
    // first + g, first + g + groups, ..., so a thread's loads do not wait on each other's sums
    // (one chain of `seen - first` dependent loads per column was most of this kernel's time);
    // the groups' sums meet in shared memory (`sums`, groups * hd floats after the scores).
    float* out = partial + (row * gridDim.y + blockIdx.y) * (hd + 2);
    int packs = (hd + PACK - 1) / PACK;
    int groups = max(1, (int)blockDim.x / packs);
    float* sums = p + keys_per_split;
    for (int task = threadIdx.x; task < groups * packs; task += blockDim.x) {
        int g = task / packs, d = (task % packs) * PACK;
        float acc[PACK];
#pragma unroll
        for (int u = 0; u < PACK; u++) acc[u] = 0.0f;
        for (int j = first + g; j < seen; j += groups) {
            float v[PACK];
            load_pack(v_base + (long long)j * hd, d, hd, v);
            float w = p[j - first];
#pragma unroll
            for (int u = 0; u < PACK; u++) acc[u] = fmaf(w, v[u], acc[u]);
        }
#pragma unroll
        for (int u = 0; u < PACK; u++)
            if (d + u < hd) sums[g * hd + d + u] = acc[u];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int g = 0; g < groups; g++) acc += sums[g * hd + d];
        if (whole) st(&context[row * hd + d], acc / sum);
        else out[2 + d] = acc;
    }
    if (!whole && threadIdx.x == 0) {
        out[0] = mx;
        out[1] = sum;
    }
}

// The context of each query row from attention_cached's partial softmaxes over `splits` splits
// of keys_per_split columns (those that start below the filled columns): each split's sums
// rescaled to the largest maximum. A row that saw no key gets the mean of the filled values.
// One block per query row.
extern "C" __global__ void attention_combine(const float* __restrict__ partial, const T* __restrict__ v_cache,
                                             T* __restrict__ context, int heads, int kv_heads, int seq,
                                             const int* __restrict__ past_len, int capacity, int hd,
                                             int keys_per_split, int splits) {
    wait_for_prior_grids();
    long long row = blockIdx.x;
    int keys = min(*past_len + seq, capacity);
    int used = min(splits, (keys + keys_per_split - 1) / keys_per_split);
    const float* in = partial + row * splits * (hd + 2);
    float mx = -QLORA_INFINITY;
    for (int s = 0; s < used; s++) mx = fmaxf(mx, in[s * (hd + 2)]);
    if (mx == -QLORA_INFINITY) {
        mean_of_values(v_cache + cache_head_offset(row, seq, heads, kv_heads, capacity, hd), keys, hd,
                       context + row * hd);
        return;
    }
    float total = 0.0f;
    for (int s = 0; s < used; s++) {
        float m = in[s * (hd + 2)];
        if (m != -QLORA_INFINITY) total += expf(m - mx) * in[s * (hd + 2) + 1];
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < used; s++) {
            float m = in[s * (hd + 2)];
            if (m != -QLORA_INFINITY) acc = fmaf(expf(m - mx), in[s * (hd + 2) + 2 + d], acc);
        }
        st(&context[row * hd + d], acc / total);
    }
}

// transformers' RepetitionPenaltyLogitsProcessor on logits [B, vocab] (f32): each listed token
// (tokens [B, max_tokens], counts[b] of them valid, each token once) is divided by the penalty
// when positive and multiplied by it when negative.
extern "C" __global__ void repetition_penalty(float* logits, const unsigned int* __restrict__ tokens,
                                              const int* __restrict__ counts, int max_tokens, int vocab,
                                              float penalty) {
    wait_for_prior_grids();
    int b = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= counts[b]) return;
    unsigned int token = tokens[(long long)b * max_tokens + i];
    float* l = logits + (long long)b * vocab + token;
    *l = *l < 0.0f ? *l * penalty : *l / penalty;
}

// The greedy choice in two passes, so that a 250k-entry row is read by many blocks: argmax_slices
// reduces slice k of row b to its best (value, index) at [b * gridDim.x + k], argmax_pairs
// reduces a row's pairs to ids[b]. The larger value wins, then the smaller index (the first
// maximum); NaN never wins; a row of only NaN gives token 0, as a host argmax over it does.
#define ARGMAX_NONE 0xffffffffu

__device__ __forceinline__ void keep_better(float& value, unsigned int& index, float v, unsigned int i) {
    if (v > value || (v == value && i < index)) { value = v; index = i; }
}

// The block's best pair, in thread 0.
__device__ void block_argmax(float& value, unsigned int& index) {
    __shared__ float best_value[32];
    __shared__ unsigned int best_index[32];
    for (int o = 16; o > 0; o >>= 1)
        keep_better(value, index, __shfl_xor_sync(0xffffffffu, value, o), __shfl_xor_sync(0xffffffffu, index, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { best_value[warp] = value; best_index[warp] = index; }
    __syncthreads();
    if (warp == 0) {
        bool real = lane < (blockDim.x >> 5);
        value = real ? best_value[lane] : -QLORA_INFINITY;
        index = real ? best_index[lane] : ARGMAX_NONE;
        for (int o = 16; o > 0; o >>= 1)
            keep_better(value, index, __shfl_xor_sync(0xffffffffu, value, o), __shfl_xor_sync(0xffffffffu, index, o));
    }
}

extern "C" __global__ void argmax_slices(const float* __restrict__ logits, int vocab, int slice,
                                         float* __restrict__ values, unsigned int* __restrict__ indices) {
    wait_for_prior_grids();
    const float* row = logits + (long long)blockIdx.y * vocab;
    int end = min(vocab, (blockIdx.x + 1) * slice);
    float value = -QLORA_INFINITY;
    unsigned int index = ARGMAX_NONE;
    for (int j = blockIdx.x * slice + threadIdx.x; j < end; j += blockDim.x) keep_better(value, index, row[j], j);
    block_argmax(value, index);
    if (threadIdx.x == 0) {
        long long at = (long long)blockIdx.y * gridDim.x + blockIdx.x;
        values[at] = value;
        indices[at] = index;
    }
}

extern "C" __global__ void argmax_pairs(const float* __restrict__ values, const unsigned int* __restrict__ indices,
                                        int n, unsigned int* __restrict__ ids) {
    wait_for_prior_grids();
    long long base = (long long)blockIdx.x * n;
    float value = -QLORA_INFINITY;
    unsigned int index = ARGMAX_NONE;
    for (int k = threadIdx.x; k < n; k += blockDim.x) keep_better(value, index, values[base + k], indices[base + k]);
    block_argmax(value, index);
    if (threadIdx.x == 0) ids[blockIdx.x] = index == ARGMAX_NONE ? 0u : index;
}

// A float's place in f32::total_cmp's order, as an unsigned key (larger key, larger float).
__device__ __forceinline__ unsigned int order_key(float v) {
    unsigned int bits = __float_as_uint(v);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned int key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Sampling's top-k on the device, as transformers' TopKLogitsWarper (and the CPU Sampler): the
// scores of row b are logits[b, :] * inv_temperature (f32, as the host computes them); every
// score not below the k-th largest (ties with it included) becomes a candidate (index, score),
// written in no particular order to indices/values [B, room]; counts[b] says how many there are
// (more than `room`: only `room` written, the caller reads the row instead). The k-th largest
// is found by radix selection over the scores' order keys, 8 bits per pass. One block per row.
extern "C" __global__ void top_k_candidates(const float* __restrict__ logits, int vocab, float inv_temperature,
                                            int k, unsigned int* __restrict__ indices,
                                            float* __restrict__ values, int room, int* __restrict__ counts) {
    wait_for_prior_grids();
    __shared__ unsigned int histogram[256];
    __shared__ unsigned int prefix, prefix_mask;
    __shared__ int remaining, found;
    const float* row = logits + (long long)blockIdx.x * vocab;
    if (threadIdx.x == 0) {
        prefix = 0;
        prefix_mask = 0;
        remaining = k;
        found = 0;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) histogram[i] = 0;
        __syncthreads();
        unsigned int want = prefix, mask = prefix_mask;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            unsigned int key = order_key(row[j] * inv_temperature);
            if ((key & mask) == want) atomicAdd(&histogram[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // The bin, from the top, where the count reaches the k-th largest.
            int need = remaining, bin = 255;
            for (; bin > 0 && (int)histogram[bin] < need; bin--) need -= (int)histogram[bin];
            remaining = need;
            prefix |= (unsigned int)bin << shift;
            prefix_mask |= 255u << shift;
        }
        __syncthreads();
    }
    // Kept as the CPU keeps them: every score that is not < the k-th largest.
    float kth = key_value(prefix);
    long long base = (long long)blockIdx.x * room;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float s = row[j] * inv_temperature;
        if (!(s < kth)) {
            int at = atomicAdd(&found, 1);
            if (at < room) {
                indices[base + at] = (unsigned int)j;
                values[base + at] = s;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) counts[blockIdx.x] = found;
}
