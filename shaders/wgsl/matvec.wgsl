// Decoding's y = x · Wᵀ for one row of x, written for memory bandwidth: a workgroup computes
// ROWS output features with LANES threads each; a lane reads its share of the weight row 16
// bytes at a time (matvec_q4.wgsl, matvec_dense.wgsl: the entry points), and the lanes' sums
// meet in workgroup memory. Compiled after linear_params.wgsl and the weight's file.

// x as 16-byte loads: every buffer is padded to 16 bytes, and the wide paths read x from
// element 0 in steps of 4 elements.
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;

const LANES: u32 = 32u;
const ROWS: u32 = 8u;
const MATVEC_THREADS: u32 = 256u;
var<workgroup> lane_sums: array<f32, MATVEC_THREADS>;

fn x_at(k: u32) -> f32 {
    return x[k / 4u][k % 4u];
}

// This thread's output feature and its lane in the feature's group of threads.
fn feature(wg: vec3<u32>, groups: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wg, groups) * ROWS + lid / LANES;
}

// Σ W[n, k] x[k] over this lane's k (lane, lane + LANES, ...): the path for rows that are not
// whole 16-byte loads.
fn scalar_row_dot(n: u32, lane: u32) -> f32 {
    var acc = 0.0;
    for (var k = lane; k < p.k; k = k + LANES) {
        acc = acc + x_at(k) * weight(n, k);
    }
    return acc;
}

// Sums each feature's lanes and stores the features of the workgroup. Every thread calls it.
fn reduce_and_store(lid: u32, n: u32, acc: f32) {
    let lane = lid % LANES;
    lane_sums[lid] = acc;
    workgroupBarrier();
    for (var half = LANES / 2u; half > 0u; half = half / 2u) {
        if lane < half {
            lane_sums[lid] = lane_sums[lid] + lane_sums[lid + half];
        }
        workgroupBarrier();
    }
    if lane == 0u && n < p.n {
        store(0u, n, lane_sums[lid]);
    }
}
