// What every linear kernel (linear.wgsl, matvec.wgsl) shares: its parameters, its output and
// bias, and the store of one output value. y = x · Wᵀ (+ bias), optionally scaled and
// accumulated into y.
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
    // gather_rows: the first weight row of this part of a matrix split by rows.
    row: u32,
}

@group(0) @binding(0) var<uniform> p: LinearParams;
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
