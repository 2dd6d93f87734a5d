// A full-precision weight [n, k], row-major f32 (embedding / LM head slices, LoRA matrices,
// unquantized projections). Compiled before linear.wgsl.

@group(0) @binding(4) var<storage, read> w: array<f32>;

fn weight(n: u32, k: u32) -> f32 {
    return w[n * p.k + k];
}
