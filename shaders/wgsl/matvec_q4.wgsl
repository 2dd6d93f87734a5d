// The 4-bit matvec (matvec.wgsl): a lane reads 32 codes (one vec4<u32>) per load. 32 codes lie
// in one block when the row length is a multiple of 32 (blocks are multiples of 32 elements,
// and the row then starts on a load), so the block's absmax is expanded once per load; the code
// book is read from workgroup memory. Compiled after weights_q4.wgsl.
//
// Where the dequantized values need no rounding to a half dtype and no flushing (an absmax of at
// least 2^-118: every product with a nonzero code, at least 2^-8, is then a normal f32), the
// absmax multiplies the sum of code · x once per load; otherwise each value is dequantized
// exactly as weight() does.

var<workgroup> code_book: array<f32, 16>;

const EXACT_PRODUCTS: f32 = 0x1p-118f;

// Σ W[n, k] x[k] over the 32 elements of load `at` (q4[at]), whose x are x[xs .. xs + 8].
fn dot32(codes: vec4<u32>, at: u32, xs: u32) -> f32 {
    let absmax = block_absmax(at * 32u / q.blocksize);
    if q.round_to == 0u && abs(absmax) >= EXACT_PRODUCTS {
        var s = 0.0;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let word = codes[j];
            let lo = x[xs + 2u * j];
            let hi = x[xs + 2u * j + 1u];
            // Byte b holds elements 2b (high nibble) and 2b + 1 (low nibble).
            s = s + code_book[(word >> 4u) & 0xfu] * lo.x + code_book[word & 0xfu] * lo.y
                + code_book[(word >> 12u) & 0xfu] * lo.z + code_book[(word >> 8u) & 0xfu] * lo.w
                + code_book[(word >> 20u) & 0xfu] * hi.x + code_book[(word >> 16u) & 0xfu] * hi.y
                + code_book[word >> 28u] * hi.z + code_book[(word >> 24u) & 0xfu] * hi.w;
        }
        return s * absmax;
    }
    var s = 0.0;
    for (var e = 0u; e < 32u; e = e + 1u) {
        let shift = 8u * ((e / 2u) % 4u) + select(0u, 4u, e % 2u == 0u);
        let c = (codes[e / 8u] >> shift) & 0xfu;
        s = s + round_to_dtype(mul_ftz(code_book[c], absmax)) * x_at(xs * 4u + e);
    }
    return s;
}

@compute @workgroup_size(256)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    if lid < 16u {
        code_book[lid] = tables[q.code_table + lid];
    }
    workgroupBarrier();
    let n = feature(wg, groups, lid);
    let lane = lid % LANES;
    var acc = 0.0;
    if n < p.n && p.k % 32u == 0u {
        let loads = p.k / 32u;
        let first = n * loads;
        // Two loads in flight per step.
        var j = lane;
        for (; j + LANES < loads; j = j + 2u * LANES) {
            let a = q4[first + j];
            let b = q4[first + j + LANES];
            acc = acc + dot32(a, first + j, 8u * j) + dot32(b, first + j + LANES, 8u * (j + LANES));
        }
        if j < loads {
            acc = acc + dot32(q4[first + j], first + j, 8u * j);
        }
    } else if n < p.n {
        acc = scalar_row_dot(n, lane);
    }
    reduce_and_store(lid, n, acc);
}
