// Attention pieces around the batched GEMMs: head layout changes, RoPE, and the masked softmax
// (causal + key padding, optional ALiBi) with its backward.

// Where element i of [B, heads, T, hd] lives in [B, T, heads, groups, hd] (slot `group`).
// BLOOM's fused query_key_value is [B, T, nh, 3, hd]; a plain projection has groups = 1.
__device__ __forceinline__ long long token_index(long long i, int seq, int heads, int groups, int group, int hd) {
    int d = i % hd; long long r = i / hd;
    int t = r % seq; r /= seq;
    int h = r % heads; long long b = r / heads;
    return (((b * seq + t) * heads + h) * groups + group) * hd + d;
}

// src [B, T, heads, groups, hd] (slot `group`) -> dst [B, heads, T, hd], a pack per thread
// (packs stay within a head's row when hd is a multiple of PACK).
extern "C" __global__ void heads_from_tokens(const T* __restrict__ src, T* __restrict__ dst, int batch, int seq,
                                             int heads, int groups, int group, int hd) {
    wait_for_prior_grids();
    long long i = pack_start();
    long long n = (long long)batch * seq * heads * hd;
    if (i >= n) return;
    if (hd % PACK == 0) {
        float v[PACK];
        long long s = token_index(i, seq, heads, groups, group, hd);
        load_pack(src, s, s + PACK, v);
        store_pack(dst, i, n, v);
        return;
    }
    for (long long j = i; j < i + PACK && j < n; j++) dst[j] = src[token_index(j, seq, heads, groups, group, hd)];
}

// The inverse: src [B, heads, T, hd] -> slot `group` of dst [B, T, heads, groups, hd].
extern "C" __global__ void tokens_from_heads(const T* __restrict__ src, T* __restrict__ dst, int batch, int seq,
                                             int heads, int groups, int group, int hd) {
    wait_for_prior_grids();
    long long i = pack_start();
    long long n = (long long)batch * seq * heads * hd;
    if (i >= n) return;
    if (hd % PACK == 0) {
        float v[PACK];
        long long d = token_index(i, seq, heads, groups, group, hd);
        load_pack(src, i, n, v);
        store_pack(dst, d, d + PACK, v);
        return;
    }
    for (long long j = i; j < i + PACK && j < n; j++) dst[token_index(j, seq, heads, groups, group, hd)] = src[j];
}

// x [B, heads, T, hd] in place: x * cos + rotate(x) * sin with tables [B, T, hd] (each row's
// own positions: left-padded prompts); rotate maps a pair (x1, x2) to (-x2, x1), the pair being
// (c, c + hd/2) (half_split = 1) or (2j, 2j+1). `sign` = -1 applies the inverse rotation (the
// backward pass).
extern "C" __global__ void rope(T* x, const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                                long long rows, int heads, int seq, int hd, int half_split, float sign) {
    wait_for_prior_grids();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * (hd / 2)) return;
    long long row = i / (hd / 2);
    int j = i % (hd / 2);
    int t = row % seq;
    long long table_row = (row / ((long long)heads * seq)) * seq + t;
    int c1 = half_split ? j : 2 * j;
    int c2 = half_split ? j + hd / 2 : 2 * j + 1;
    T* xr = x + row * hd;
    const float* cos_row = cos_table + table_row * hd;
    const float* sin_row = sin_table + table_row * hd;
    float x1 = ld(xr[c1]), x2 = ld(xr[c2]);
    float cos1 = cos_row[c1], sin1 = sign * sin_row[c1];
    float cos2 = cos_row[c2], sin2 = sign * sin_row[c2];
    st(&xr[c1], x1 * cos1 - x2 * sin1);
    st(&xr[c2], x2 * cos2 + x1 * sin2);
}

// Rows of scores [B, kv_heads, group * T, S] (raw q.k, f32) -> probs (T): softmax over keys of
// scale * s + slope[h] * position[b, j] (ALiBi, when slopes != null), keys j > i and padding
// keys masked. A row with every key masked gets uniform weights, as transformers' eager
// attention (whose mask adds the lowest float) gives it. One warp per row.
extern "C" __global__ void softmax_fwd(const float* __restrict__ scores, T* __restrict__ probs,
                                       const float* __restrict__ key_mask, const float* __restrict__ slopes,
                                       const float* __restrict__ positions, long long rows, int kv_heads,
                                       int group, int seq, int keys, float scale) {
    wait_for_prior_grids();
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    int i = row % seq;                                  // query position
    long long gh = row / seq;                           // (b, kv head, member)
    int head = gh % ((long long)kv_heads * group);      // query head = kv_head * group + member
    int b = gh / ((long long)kv_heads * group);
    const float* s = scores + row * keys;
    const float* km = key_mask + (long long)b * keys;
    float slope = slopes != nullptr ? slopes[head] : 0.0f;
    int offset = keys - seq;                            // cached keys before the first query
    float mx = -QLORA_INFINITY;
    for (int j = lane; j < keys; j += 32) {
        if (j <= i + offset && km[j] != 0.0f) {
            float v = s[j] * scale + (slopes != nullptr ? slope * positions[(long long)b * keys + j] : 0.0f);
            mx = fmaxf(mx, v);
        }
    }
    mx = warp_max(mx);
    T* p = probs + row * keys;
    if (mx == -QLORA_INFINITY) {
        for (int j = lane; j < keys; j += 32) st(&p[j], 1.0f / keys);
        return;
    }
    float sum = 0.0f;
    for (int j = lane; j < keys; j += 32) {
        if (j <= i + offset && km[j] != 0.0f) {
            float v = s[j] * scale + (slopes != nullptr ? slope * positions[(long long)b * keys + j] : 0.0f);
            sum += expf(v - mx);
        }
    }
    sum = warp_sum(sum);
    float inv = 1.0f / sum;
    for (int j = lane; j < keys; j += 32) {
        float e = 0.0f;
        if (j <= i + offset && km[j] != 0.0f) {
            float v = s[j] * scale + (slopes != nullptr ? slope * positions[(long long)b * keys + j] : 0.0f);
            e = expf(v - mx) * inv;
        }
        st(&p[j], e);
    }
}

// dscores = scale * p * (dp - sum(p * dp)) per row; dp (f32) from the GEMM dctx . v^T.
extern "C" __global__ void softmax_bwd(const T* __restrict__ probs, const float* __restrict__ dprobs,
                                       T* __restrict__ dscores, long long rows, int keys, float scale) {
    wait_for_prior_grids();
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* p = probs + row * keys;
    const float* dp = dprobs + row * keys;
    float dot = 0.0f;
    for (int j = lane; j < keys; j += 32) dot += ld(p[j]) * dp[j];
    dot = warp_sum(dot);
    for (int j = lane; j < keys; j += 32) st(&dscores[row * keys + j], scale * ld(p[j]) * (dp[j] - dot));
}
