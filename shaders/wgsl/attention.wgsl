// Causal self-attention of `t` new tokens over a KV cache, batch 1.
//
// Layouts: the cache holds [max_seq, kv_heads, head_dim] keys and values; a projection output
// `src` row r, head h, channel c is at r * row_stride + h * head_stride + offset + c (BLOOM's
// fused [t, heads, 3, head_dim] q/k/v and LLaMA's separate q, k, v are both such views). New
// token i sits at position past + i, `past` being the step buffer's (step.wgsl).
//   rope:      rotates channel pairs of `src` in place (cos/sin tables [max_seq, head_dim / 2]).
//   kv_append: copies the new keys and values into the cache.
//   attention: softmax(q·kᵀ · scale + alibi_slope[h] · key_position) · v per (token, head),
//              GQA: query head h reads kv head h / (heads / kv_heads).

struct AttnParams {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    t: u32,
    max_seq: u32,
    row_stride: u32,
    head_stride: u32,
    // First channel of q (attention, rope) or k (kv_append).
    offset: u32,
    // kv_append: first channel of v in its source.
    v_offset: u32,
    // rope: 0 pairs (j, j + d/2) (HF rotate_half), 1 pairs (2j, 2j + 1) (llama.cpp).
    rope_adjacent: u32,
    // attention: 1 adds ALiBi.
    alibi: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(14) var<storage, read> step: array<u32>;

const THREADS: u32 = 64u;
// -f32::MAX, exactly (a decimal literal past it is a compile error in Chromium's Tint).
const LOWEST: f32 = -0x1.fffffep+127f;

// ---- rope -------------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read_write> rope_x: array<f32>;
@group(0) @binding(2) var<storage, read> cos_table: array<f32>;
@group(0) @binding(3) var<storage, read> sin_table: array<f32>;

// One thread per (token, head, pair); `heads` counts the heads of this projection.
@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) id: vec3<u32>) {
    let half_d = p.head_dim / 2u;
    let i = id.x;
    if i >= p.t * p.heads * half_d {
        return;
    }
    let j = i % half_d;
    let h = (i / half_d) % p.heads;
    let row = i / (half_d * p.heads);
    let base = row * p.row_stride + h * p.head_stride + p.offset;
    var a = base + j;
    var b = base + j + half_d;
    if p.rope_adjacent == 1u {
        a = base + 2u * j;
        b = a + 1u;
    }
    let at = (step[STEP_PAST] + row) * half_d + j;
    let c = cos_table[at];
    let s = sin_table[at];
    let x1 = rope_x[a];
    let x2 = rope_x[b];
    rope_x[a] = x1 * c + (-x2) * s;
    rope_x[b] = x2 * c + x1 * s;
}

// ---- kv_append --------------------------------------------------------------------------

@group(0) @binding(4) var<storage, read> k_src: array<f32>;
@group(0) @binding(5) var<storage, read> v_src: array<f32>;
@group(0) @binding(6) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(7) var<storage, read_write> v_cache: array<f32>;

// One thread per (token, kv head, channel).
@compute @workgroup_size(64)
fn kv_append(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    let width = p.kv_heads * p.head_dim;
    if i >= p.t * width {
        return;
    }
    let c = i % p.head_dim;
    let h = (i / p.head_dim) % p.kv_heads;
    let row = i / width;
    let src = row * p.row_stride + h * p.head_stride + c;
    let dst = (step[STEP_PAST] + row) * width + h * p.head_dim + c;
    k_cache[dst] = k_src[src + p.offset];
    v_cache[dst] = v_src[src + p.v_offset];
}

// ---- attention --------------------------------------------------------------------------

@group(0) @binding(8) var<storage, read> q_src: array<f32>;
@group(0) @binding(9) var<storage, read> keys: array<f32>;
@group(0) @binding(10) var<storage, read> values: array<f32>;
@group(0) @binding(11) var<storage, read> slopes: array<f32>;
// [t, heads, max_seq] scores, then probabilities.
@group(0) @binding(12) var<storage, read_write> scores: array<f32>;
// [t, heads * head_dim]
@group(0) @binding(13) var<storage, read_write> context: array<f32>;

var<workgroup> partial: array<f32, THREADS>;

fn reduce_max(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var half = THREADS / 2u; half > 0u; half = half / 2u) {
        if lid < half {
            partial[lid] = max(partial[lid], partial[lid + half]);
        }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var half = THREADS / 2u; half > 0u; half = half / 2u) {
        if lid < half {
            partial[lid] = partial[lid] + partial[lid + half];
        }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

// One workgroup per (token, head): workgroup (h, row).
@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.x;
    let row = wg.y;
    let d = p.head_dim;
    let kv = h / (p.heads / p.kv_heads);
    let q_base = row * p.row_stride + h * p.head_stride + p.offset;
    let keys_seen = step[STEP_PAST] + row + 1u;
    let s_base = (row * p.heads + h) * p.max_seq;
    let kv_width = p.kv_heads * d;
    var slope = 0.0;
    if p.alibi == 1u {
        slope = slopes[h];
    }
    var local_max = LOWEST;
    for (var j = lid; j < keys_seen; j = j + THREADS) {
        var dot = 0.0;
        for (var c = 0u; c < d; c = c + 1u) {
            dot = dot + q_src[q_base + c] * keys[j * kv_width + kv * d + c];
        }
        let s = dot * p.scale + slope * f32(j);
        scores[s_base + j] = s;
        local_max = max(local_max, s);
    }
    let m = reduce_max(lid, local_max);
    var local_sum = 0.0;
    for (var j = lid; j < keys_seen; j = j + THREADS) {
        let e = exp(scores[s_base + j] - m);
        scores[s_base + j] = e;
        local_sum = local_sum + e;
    }
    let total = reduce_sum(lid, local_sum);
    for (var j = lid; j < keys_seen; j = j + THREADS) {
        scores[s_base + j] = scores[s_base + j] / total;
    }
    storageBarrier();
    workgroupBarrier();
    for (var c = lid; c < d; c = c + THREADS) {
        var acc = 0.0;
        for (var j = 0u; j < keys_seen; j = j + 1u) {
            acc = acc + scores[s_base + j] * values[j * kv_width + kv * d + c];
        }
        context[row * p.heads * d + h * d + c] = acc;
    }
}
