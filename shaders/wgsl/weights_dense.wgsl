// A full-precision weight [n, k], row-major, in the dtype the checkpoint stored it in
// (embedding and LM head slices, unquantized projections, LoRA matrices): f32, or f16 / bf16
// two to a word (little-endian, element 2i in the low half), widened exactly; read four words
// at a time (the buffer is padded to 16 bytes). Compiled after linear_params.wgsl, before
// linear.wgsl or matvec_dense.wgsl; the pipeline sets DTYPE.

// 0: f32, 1: f16, 2: bf16.
override DTYPE: u32 = 0u;

@group(0) @binding(4) var<storage, read> w: array<vec4<u32>>;

fn w_word(i: u32) -> u32 {
    return w[i / 4u][i % 4u];
}

fn weight(n: u32, k: u32) -> f32 {
    let i = n * p.k + k;
    if DTYPE == 0u {
        return bitcast<f32>(w_word(i));
    }
    let word = w_word(i / 2u);
    let half_bits = select(word & 0xffffu, word >> 16u, i % 2u == 1u);
    if DTYPE == 1u {
        return unpack2x16float(half_bits).x;
    }
    return bitcast<f32>(half_bits << 16u);
}
