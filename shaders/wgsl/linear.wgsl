// The prefill and data-movement kernels of a linear weight: the tiled product for several rows
// of x (decoding's single row goes through matvec.wgsl), the weight unpacked to f32, and the
// embedding lookup. Compiled after linear_params.wgsl and weights_q4.wgsl or weights_dense.wgsl,
// which bind the weight (bindings 4..) and define `fn weight(n: u32, k: u32) -> f32`, W[n, k].

@group(0) @binding(1) var<storage, read> x: array<f32>;

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

// The embedding lookup of a forward pass's new tokens, for the part of the embedding (split by
// rows) holding weight rows p.row .. p.row + p.n: token i's row, widened to f32, into
// y[i * k .. (i + 1) * k]; tokens of other parts are left to their part's dispatch. Workgroup
// (column block, token i). The ids come from the step buffer (step.wgsl), so the dispatch is
// the same from step to step.
@group(0) @binding(7) var<storage, read> step: array<u32>;

@compute @workgroup_size(64)
fn gather_rows(@builtin(global_invocation_id) id: vec3<u32>) {
    let token = step[STEP_TOKENS + id.y];
    if id.x < p.k && token >= p.row && token - p.row < p.n {
        y[id.y * p.k + id.x] = weight(token - p.row, id.x);
    }
}
