// The cross-entropy of a chunk of LM-head logits [C, V] (f32) and its gradient, in one pass per
// row (llm.c's fused classifier): loss[r] = weight[r] * (logsumexp(x) - x[target]), and
// grad[r] = weight[r] * inv_count * (softmax(x) - onehot(target)) written as T for the next GEMM.
extern "C" __global__ void cross_entropy_fwd_bwd(const float* __restrict__ logits, const unsigned int* __restrict__ targets,
                                                 const float* __restrict__ weights, float* __restrict__ loss,
                                                 T* __restrict__ grad, int vocab, float inv_count) {
    wait_for_prior_grids();
    long long row = blockIdx.x;
    const float* x = logits + row * vocab;
    T* g = grad + row * vocab;
    float w = weights[row];
    if (w == 0.0f) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) st(&g[j], 0.0f);
        if (threadIdx.x == 0) loss[row] = 0.0f;
        return;
    }
    float mx = -QLORA_INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, x[j]);
    mx = block_max(mx);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(x[j] - mx);
    sum = block_sum(sum);
    unsigned int target = targets[row];
    float coefficient = w * inv_count;
    float scale = coefficient / sum;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = expf(x[j] - mx) * scale;
        if (j == (int)target) v -= coefficient;
        st(&g[j], v);
    }
    if (threadIdx.x == 0) loss[row] = w * (mx + logf(sum) - x[target]);
}
