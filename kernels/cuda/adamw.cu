// AdamW as torch.optim.AdamW (and train/optimizer.rs): decoupled decay, then the bias-corrected
// Adam update, on fp32 master weights; also refreshes the compute copy (T) of the parameters.
extern "C" __global__ void adamw(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
                                 float* __restrict__ v, T* __restrict__ param_t, long long n, float decay,
                                 float one_minus_beta1, float beta2, float one_minus_beta2, float step_size,
                                 float bias_correction2_sqrt, float eps) {
    wait_for_prior_grids();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float p = param[i] * decay;
    float g = grad[i];
    float mi = m[i] + (g - m[i]) * one_minus_beta1;
    float vi = v[i] * beta2 + g * g * one_minus_beta2;
    float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
    p -= step_size * mi / denom;
    m[i] = mi; v[i] = vi; param[i] = p;
    st(&param_t[i], p);
}
