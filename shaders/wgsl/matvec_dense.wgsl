// The full-precision matvec (matvec.wgsl): a lane reads 4 f32 or 8 f16 / bf16 weights (one
// vec4<u32>) per load, where the row length is a multiple of that (rows then start on a load).
// Compiled after weights_dense.wgsl.

// Elements per 16-byte load.
override PER_LOAD: u32 = select(8u, 4u, DTYPE == 0u);

// The two elements of a word of halves, element 2i in the low half.
fn halves(word: u32) -> vec2<f32> {
    if DTYPE == 1u {
        return unpack2x16float(word);
    }
    return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
}

// Σ W[n, k] x[k] over the elements of the row's load j (`words`).
fn dot_load(words: vec4<u32>, j: u32) -> f32 {
    if DTYPE == 0u {
        return dot(bitcast<vec4<f32>>(words), x[j]);
    }
    let lo = x[2u * j];
    let hi = x[2u * j + 1u];
    return dot(vec4<f32>(halves(words.x), halves(words.y)), lo)
        + dot(vec4<f32>(halves(words.z), halves(words.w)), hi);
}

@compute @workgroup_size(256)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let n = feature(wg, groups, lid);
    let lane = lid % LANES;
    var acc = 0.0;
    if n < p.n && p.k % PER_LOAD == 0u {
        let loads = p.k / PER_LOAD;
        let first = n * loads;
        // Two loads in flight per step.
        var j = lane;
        for (; j + LANES < loads; j = j + 2u * LANES) {
            let a = w[first + j];
            let b = w[first + j + LANES];
            acc = acc + dot_load(a, j) + dot_load(b, j + LANES);
        }
        if j < loads {
            acc = acc + dot_load(w[first + j], j);
        }
    } else if n < p.n {
        acc = scalar_row_dot(n, lane);
    }
    reduce_and_store(lid, n, acc);
}
