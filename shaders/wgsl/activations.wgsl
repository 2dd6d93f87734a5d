// Element-wise MLP activations, in place on `a` (n elements).
//   gelu_tanh: BLOOM's x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))
//   silu_mul:  a = silu(a) * b, the gated MLP of the LLaMA family (a = gate, b = up)

struct ActParams {
    n: u32,
}

@group(0) @binding(0) var<uniform> p: ActParams;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

fn index(id: vec3<u32>, groups: vec3<u32>) -> u32 {
    return (id.y * groups.x) * 64u + id.x;
}

// tanh from exp(-2|x|), which cannot overflow for large |x|.
fn stable_tanh(v: f32) -> f32 {
    let t = exp(-2.0 * abs(v));
    let r = (1.0 - t) / (1.0 + t);
    return select(r, -r, v < 0.0);
}

@compute @workgroup_size(64)
fn gelu_tanh(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = index(id, groups);
    if i < p.n {
        let v = a[i];
        let cubic = 0.044715 * v * v + 1.0;
        let inner = 0.79788456 * v * cubic;
        a[i] = 0.5 * v * (stable_tanh(inner) + 1.0);
    }
}

@compute @workgroup_size(64)
fn silu_mul(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = index(id, groups);
    if i < p.n {
        let g = a[i];
        a[i] = g / (1.0 + exp(-g)) * b[i];
    }
}
