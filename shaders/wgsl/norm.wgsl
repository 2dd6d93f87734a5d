// LayerNorm and RMSNorm over the last dimension, one workgroup per row:
//   layer_norm: (x - mean) / sqrt(var + eps) * weight + bias (biased variance, torch.nn.LayerNorm)
//   rms_norm:   x * (1 / sqrt(mean(x²) + eps)) * weight (LlamaRMSNorm)

struct NormParams {
    dim: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: NormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> weight: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

const THREADS: u32 = 256u;
var<workgroup> partial: array<f32, THREADS>;

// The sum of every thread's `v`, seen by all threads.
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var half = THREADS / 2u; half > 0u; half = half / 2u) {
        if lid < half {
            partial[lid] = partial[lid] + partial[lid + half];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn layer_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wg.x * p.dim;
    var s = 0.0;
    for (var i = lid; i < p.dim; i = i + THREADS) {
        s = s + x[base + i];
    }
    let mean = workgroup_sum(lid, s) / f32(p.dim);
    var s2 = 0.0;
    for (var i = lid; i < p.dim; i = i + THREADS) {
        let c = x[base + i] - mean;
        s2 = s2 + c * c;
    }
    let variance = workgroup_sum(lid, s2) / f32(p.dim);
    let denominator = sqrt(variance + p.eps);
    for (var i = lid; i < p.dim; i = i + THREADS) {
        y[base + i] = (x[base + i] - mean) / denominator * weight[i] + bias[i];
    }
}

@compute @workgroup_size(256)
fn rms_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wg.x * p.dim;
    var s2 = 0.0;
    for (var i = lid; i < p.dim; i = i + THREADS) {
        s2 = s2 + x[base + i] * x[base + i];
    }
    let inverse = 1.0 / sqrt(workgroup_sum(lid, s2) / f32(p.dim) + p.eps);
    for (var i = lid; i < p.dim; i = i + THREADS) {
        y[base + i] = x[base + i] * inverse * weight[i];
    }
}
