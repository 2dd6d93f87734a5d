// y = x · Wᵀ (+ bias), optionally scaled and accumulated into y. The weight's storage is not
// declared here: this file is compiled after weights_q4.wgsl or weights_dense.wgsl, which bind it
// (bindings 4..) and define `fn weight(n: u32, k: u32) -> f32`, the element W[n, k], and
// `fn weight8(n: u32, k: u32) -> array<f32, 8>`, W[n, k .. k + 8] for k a multiple of 8 in rows
// of a multiple of 8 (one word of 4-bit codes, within one block).
//
// Shapes: x [rows, k] with row stride x_stride; y [rows, *] with row stride y_stride, columns
// y_offset .. y_offset + n (a weight split by rows writes its slice of the columns).

struct LinearParams {
    rows: u32,
    n: u32,
    k: u32,
    x_stride: u32,
    y_stride: u32,
    y_offset: u32,
    // bit 0: add to y instead of overwriting it; bit 1: add bias[y_offset + n].
    flags: u32,
    scale: f32,
    // gather_row: the weight row to copy.
    row: u32,
}

@group(0) @binding(0) var<uniform> p: LinearParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;

const ACCUMULATE: u32 = 1u;
const HAS_BIAS: u32 = 2u;

fn store(row: u32, n: u32, acc: f32) {
    let col = p.y_offset + n;
    let at = row * p.y_stride + col;
    var v = acc * p.scale;
    if (p.flags & HAS_BIAS) != 0u {
        v = v + bias[col];
    }
    if (p.flags & ACCUMULATE) != 0u {
        v = y[at] + v;
    }
    y[at] = v;
}

// The index of a workgroup in a 2-d grid (grids wider than 65535 wrap into y).
fn flat_group(wg: vec3<u32>, groups: vec3<u32>) -> u32 {
    return wg.y * groups.x + wg.x;
}

const MATVEC_THREADS: u32 = 64u;
var<workgroup> partial: array<f32, MATVEC_THREADS>;

// Decode: one workgroup per output feature, for every input row (rows is 1 when decoding).
@compute @workgroup_size(64)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let n = flat_group(wg, groups);
    for (var row = 0u; row < p.rows; row = row + 1u) {
        var acc = 0.0;
        if n < p.n && p.k % 8u == 0u {
            for (var k = 8u * lid; k < p.k; k = k + 8u * MATVEC_THREADS) {
                let w = weight8(n, k);
                for (var j = 0u; j < 8u; j = j + 1u) {
                    acc = acc + x[row * p.x_stride + k + j] * w[j];
                }
            }
        } else if n < p.n {
            for (var k = lid; k < p.k; k = k + MATVEC_THREADS) {
                acc = acc + x[row * p.x_stride + k] * weight(n, k);
            }
        }
        partial[lid] = acc;
        workgroupBarrier();
        for (var half = MATVEC_THREADS / 2u; half > 0u; half = half / 2u) {
            if lid < half {
                partial[lid] = partial[lid] + partial[lid + half];
            }
            workgroupBarrier();
        }
        if lid == 0u && n < p.n {
            store(row, n, partial[0]);
        }
        workgroupBarrier();
    }
}

// Prefill: 16 x 16 output tiles (rows x features); each step stages a 16 x 16 tile of x and of
// W (dequantized on the fly, never written back) in workgroup memory.
const TILE: u32 = 16u;
var<workgroup> x_tile: array<array<f32, TILE>, TILE>;
var<workgroup> w_tile: array<array<f32, TILE>, TILE>;

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.y * TILE + lid.y;
    let n = wg.x * TILE + lid.x;
    // Row lid.y of the W tile is output feature wg.x * TILE + lid.y.
    let w_row = wg.x * TILE + lid.y;
    let x_row = wg.y * TILE + lid.y;
    var acc = 0.0;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TILE) {
        let k = k0 + lid.x;
        var xv = 0.0;
        if x_row < p.rows && k < p.k {
            xv = x[x_row * p.x_stride + k];
        }
        x_tile[lid.y][lid.x] = xv;
        var wv = 0.0;
        if w_row < p.n && k < p.k {
            wv = weight(w_row, k);
        }
        w_tile[lid.y][lid.x] = wv;
        workgroupBarrier();
        for (var i = 0u; i < TILE; i = i + 1u) {
            acc = acc + x_tile[lid.y][i] * w_tile[lid.x][i];
        }
        workgroupBarrier();
    }
    if row < p.rows && n < p.n {
        store(row, n, acc);
    }
}

// The weight as f32, y[n * k + j] = W[n, j]: what the fused kernels compute with (tests).
@compute @workgroup_size(64)
fn unpack(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wg, groups) * 64u + lid;
    if i < p.n * p.k {
        y[i] = weight(i / p.k, i % p.k);
    }
}

// An embedding lookup: row p.row of the weight, widened to f32, into y[y_offset .. y_offset + k].
@compute @workgroup_size(64)
fn gather_row(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x < p.k {
        y[p.y_offset + id.x] = weight(p.row, id.x);
    }
}
