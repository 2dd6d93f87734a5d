// Choosing the next token from the logits [n] of the last position, in one workgroup.
//   repetition_penalty: transformers' processor, for each (distinct) id of the context:
//                       a positive logit is divided by the penalty, a negative one multiplied.
//   argmax:             greedy, the first index on ties (torch.argmax).
//   sample:             softmax(logits / temperature), restricted to the top-k tokens, then to
//                       the smallest most likely set whose mass reaches top_p, then the token
//                       whose cumulative-probability interval holds u * kept mass (u drawn on
//                       the host from a seeded RNG).

struct SampleParams {
    n: u32,
    context_len: u32,
    // 0: no top-k.
    top_k: u32,
    temperature: f32,
    top_p: f32,
    penalty: f32,
    u: f32,
}

@group(0) @binding(0) var<uniform> p: SampleParams;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> context_ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> token: array<u32>;

const THREADS: u32 = 256u;
// -f32::MAX, exactly: a decimal literal past the largest f32 (such as -3.40282347e38) is a
// compile error in Chromium's WGSL compiler (Tint), where naga rounds it.
const LOWEST: f32 = -0x1.fffffep+127f;

@compute @workgroup_size(64)
fn repetition_penalty(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x >= p.context_len {
        return;
    }
    let t = context_ids[id.x];
    if t < p.n {
        let v = logits[t];
        logits[t] = select(v / p.penalty, v * p.penalty, v < 0.0);
    }
}

var<workgroup> best_value: array<f32, THREADS>;
var<workgroup> best_index: array<u32, THREADS>;

fn better(v: f32, i: u32, w: f32, j: u32) -> bool {
    return v > w || (v == w && i < j);
}

@compute @workgroup_size(256)
fn argmax(@builtin(local_invocation_index) lid: u32) {
    var v = LOWEST;
    var i = p.n;
    for (var j = lid; j < p.n; j = j + THREADS) {
        if i == p.n || logits[j] > v {
            v = logits[j];
            i = j;
        }
    }
    best_value[lid] = v;
    best_index[lid] = i;
    workgroupBarrier();
    for (var half = THREADS / 2u; half > 0u; half = half / 2u) {
        if lid < half && better(best_value[lid + half], best_index[lid + half], best_value[lid], best_index[lid]) {
            best_value[lid] = best_value[lid + half];
            best_index[lid] = best_index[lid + half];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        token[0] = best_index[0];
    }
}

var<workgroup> partial: array<f32, THREADS>;

fn reduce(lid: u32, v: f32, take_max: bool) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var half = THREADS / 2u; half > 0u; half = half / 2u) {
        if lid < half {
            let o = partial[lid + half];
            partial[lid] = select(partial[lid] + o, max(partial[lid], o), take_max);
        }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

// Probability mass (or count) of the tokens with probability >= threshold, in `logits`, which
// holds probabilities by then.
fn mass_from(lid: u32, threshold: f32, count: bool) -> f32 {
    var s = 0.0;
    for (var j = lid; j < p.n; j = j + THREADS) {
        if logits[j] >= threshold {
            s = s + select(logits[j], 1.0, count);
        }
    }
    return reduce(lid, s, false);
}

// The largest threshold whose kept mass (or count) is still >= goal, by bisection.
fn threshold_for(lid: u32, goal: f32, top: f32, count: bool) -> f32 {
    var lo = 0.0;
    var hi = top;
    for (var step = 0u; step < 40u; step = step + 1u) {
        let mid = 0.5 * (lo + hi);
        if mass_from(lid, mid, count) >= goal {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

@compute @workgroup_size(256)
fn sample(@builtin(local_invocation_index) lid: u32) {
    var m = LOWEST;
    for (var j = lid; j < p.n; j = j + THREADS) {
        m = max(m, logits[j] / p.temperature);
    }
    m = reduce(lid, m, true);
    var s = 0.0;
    for (var j = lid; j < p.n; j = j + THREADS) {
        let e = exp(logits[j] / p.temperature - m);
        logits[j] = e;
        s = s + e;
    }
    let total = reduce(lid, s, false);
    var top = 0.0;
    for (var j = lid; j < p.n; j = j + THREADS) {
        logits[j] = logits[j] / total;
        top = max(top, logits[j]);
    }
    storageBarrier();
    top = reduce(lid, top, true);
    var threshold = 0.0;
    if p.top_k > 0u && p.top_k < p.n {
        threshold = threshold_for(lid, f32(p.top_k), top, true);
    }
    let kept = mass_from(lid, threshold, false);
    if p.top_p < 1.0 {
        threshold = threshold_for(lid, p.top_p * kept, top, false);
    }
    // Contiguous chunks, one per thread, so the cumulative order is the token order.
    let chunk = (p.n + THREADS - 1u) / THREADS;
    var chunk_mass = 0.0;
    for (var j = lid * chunk; j < min(p.n, (lid + 1u) * chunk); j = j + 1u) {
        if logits[j] >= threshold {
            chunk_mass = chunk_mass + logits[j];
        }
    }
    partial[lid] = chunk_mass;
    workgroupBarrier();
    if lid == 0u {
        var all = 0.0;
        for (var i = 0u; i < THREADS; i = i + 1u) {
            all = all + partial[i];
        }
        let goal = p.u * all;
        // The chunk that holds the goal (the last one with any mass if rounding overshoots),
        // then the token within it.
        var cumulative = 0.0;
        var found = 0u;
        var before = 0.0;
        for (var i = 0u; i < THREADS; i = i + 1u) {
            if partial[i] > 0.0 {
                found = i;
                before = cumulative;
                if goal < cumulative + partial[i] {
                    break;
                }
                cumulative = cumulative + partial[i];
            }
        }
        cumulative = before;
        var last = 0u;
        var chosen = p.n;
        for (var j = found * chunk; j < min(p.n, (found + 1u) * chunk); j = j + 1u) {
            if logits[j] >= threshold && logits[j] > 0.0 {
                cumulative = cumulative + logits[j];
                last = j;
                if goal < cumulative {
                    chosen = j;
                    break;
                }
            }
        }
        token[0] = select(chosen, last, chosen == p.n);
    }
}
