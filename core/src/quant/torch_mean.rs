//! `torch.Tensor.mean()` of a contiguous float32 CUDA tensor, addition for addition.
//!
//! bitsandbytes' double quantization subtracts `absmax.mean()` (computed on the GPU) from every
//! absmax before quantizing it, so the offset must be the very float torch computes. Its CUDA
//! reduction (ATen `Reduce.cuh`, `MeanOps`, `vt0 = input_vec_size = 4` for float32) sums in
//! float32 in a fixed tree; neither an exactly rounded sum (f64, then rounded) nor a sequential
//! or plain pairwise f32 sum gives the same bits, so the tree of torch 2.11 (CUDA build) is
//! reproduced here:
//! 1. the launch configuration: `n / 4` aligned loads of 4 floats when `n >= 128`, else `n`
//!    scalar loads; `block_width` = the largest power of two <= the load count, at most 512
//!    threads (one row of threads: a single output); with `ceil(n / block_width) >= 256` values
//!    per thread the input is split over `ctas_per_output` thread blocks;
//! 2. each thread sums its strided loads into 4 accumulators (load lane i, or visit k % 4),
//!    thread block 0 adds the `n % 4` tail elements to accumulator 0 afterwards, then the 4
//!    accumulators are folded left;
//! 3. each thread block folds its threads by halving: lane i takes lane i + w/2 for
//!    w = block_width, ..., 2 (shared memory down to 32 lanes, then `shfl_down` with offsets
//!    16, 8, 4, 2, 1: the CUDA build's intra-warp offsets decrease);
//! 4. with several blocks, the last one sums their partials (thread t: partials t, t + 512,
//!    ...) and folds its threads again;
//! 5. the sum is multiplied by `(float)1 / n`.
//!
//! The input is assumed 16-byte aligned, as every tensor the CUDA caching allocator hands out
//! (an unaligned view takes a different head path in torch). Only step 1's split over blocks
//! depends on the GPU (through its multiprocessor count), and only for more than
//! `528 * 16 * 512` (4.3 M) values: the count of an H100 SXM or H200 is used.

const MAX_BLOCK_THREADS: usize = 512;
const LOAD_WIDTH: usize = 4;
const ACCUMULATORS: usize = 4;
const MIN_VALUES_PER_THREAD: usize = 16;
const MAX_VALUES_PER_THREAD: usize = 256;
/// `setReduceConfig` vectorizes the loads of a contiguous reduction from this many inputs on.
const MIN_VECTORIZED_INPUTS: usize = 128;
/// H100 SXM and H200: 132 multiprocessors of 2048 threads each.
const MULTIPROCESSORS: usize = 132;
const MAX_THREADS_PER_MULTIPROCESSOR: usize = 2048;

/// The float32 mean torch computes on CUDA for these values (NaN for none, as torch).
pub(crate) fn torch_cuda_mean(xs: &[f32]) -> f32 {
    let n = xs.len();
    if n == 0 {
        return f32::NAN;
    }
    let vectorized = n >= MIN_VECTORIZED_INPUTS;
    let loads = if vectorized { n / LOAD_WIDTH } else { n };
    let width = block_width(loads);
    let blocks = blocks_per_output(n, width);
    let stride = width * blocks;
    let partials: Vec<f32> = (0..blocks)
        .map(|block| {
            let mut lanes: Vec<f32> = (0..width)
                .map(|lane| {
                    let first = block * width + lane;
                    let accumulators = if vectorized {
                        vector_accumulators(xs, first, stride, (block == 0).then_some(lane))
                    } else {
                        scalar_accumulators(xs, first, stride)
                    };
                    accumulators.into_iter().reduce(|a, b| a + b).unwrap_or(0.0)
                })
                .collect();
            block_fold(&mut lanes)
        })
        .collect();
    let total = if blocks == 1 {
        partials[0]
    } else {
        let mut lanes: Vec<f32> = (0..width)
            .map(|lane| {
                partials
                    .iter()
                    .skip(lane)
                    .step_by(width)
                    .fold(0.0, |a, &b| a + b)
            })
            .collect();
        block_fold(&mut lanes)
    };
    total * (1.0f32 / n as f32)
}

/// `ReduceConfig::set_block_dimension` for one output.
fn block_width(loads: usize) -> usize {
    if loads >= MAX_BLOCK_THREADS {
        MAX_BLOCK_THREADS
    } else {
        1 << loads.max(1).ilog2()
    }
}

/// `ctas_per_output` of `setReduceConfig` for one output.
fn blocks_per_output(n: usize, width: usize) -> usize {
    let values_per_thread = n.div_ceil(width);
    if values_per_thread < MAX_VALUES_PER_THREAD {
        return 1;
    }
    let target_grid = MULTIPROCESSORS * (MAX_THREADS_PER_MULTIPROCESSOR / width);
    target_grid
        .min(values_per_thread.div_ceil(MIN_VALUES_PER_THREAD))
        .max(values_per_thread.div_ceil(MAX_VALUES_PER_THREAD))
}

/// `input_vectorized_thread_reduce_impl`: loads of 4 floats, lane i into accumulator i; the
/// `n % 4` tail goes to accumulator 0 of the first threads of block 0 (`tail_lane`).
fn vector_accumulators(
    xs: &[f32],
    first: usize,
    stride: usize,
    tail_lane: Option<usize>,
) -> [f32; ACCUMULATORS] {
    let mut acc = [0.0f32; ACCUMULATORS];
    let mut load = first;
    while load * LOAD_WIDTH + LOAD_WIDTH <= xs.len() {
        let chunk = &xs[load * LOAD_WIDTH..load * LOAD_WIDTH + LOAD_WIDTH];
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
        load += stride;
    }
    if let Some(lane) = tail_lane {
        let tail = xs.len() - xs.len() % LOAD_WIDTH + lane;
        if tail < xs.len() {
            acc[0] += xs[tail];
        }
    }
    acc
}

/// `thread_reduce_impl`: the k-th value a thread visits goes to accumulator k % 4.
fn scalar_accumulators(xs: &[f32], first: usize, stride: usize) -> [f32; ACCUMULATORS] {
    let mut acc = [0.0f32; ACCUMULATORS];
    for (k, &x) in xs.iter().skip(first).step_by(stride).enumerate() {
        acc[k % ACCUMULATORS] += x;
    }
    acc
}

/// `block_x_reduce`: returns what thread 0 holds at the end. Shared-memory steps and warp
/// shuffles alike add lane `i + w / 2` into lane `i`, halving `w` down to one lane.
fn block_fold(lanes: &mut [f32]) -> f32 {
    let mut width = lanes.len();
    while width > 1 {
        width /= 2;
        let (low, high) = lanes.split_at_mut(width);
        for (a, &b) in low.iter_mut().zip(&high[..width]) {
            *a += b;
        }
    }
    lanes[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_integer_means_are_exact() {
        assert_eq!(torch_cuda_mean(&[3.0]), 3.0);
        assert_eq!(torch_cuda_mean(&[1.0, 2.0, 3.0, 6.0]), 3.0);
        let ones = vec![1.0f32; 1_000_003];
        assert_eq!(torch_cuda_mean(&ones), 1.0);
        assert!(torch_cuda_mean(&[]).is_nan());
    }

    /// `t = ((arange(n) * 7919) % 1000003).double() / 1000003 * 3 + 0.1` on the CPU (one IEEE
    /// op each), then `t.float().cuda().mean()`, measured on an H200 with torch 2.11: one
    /// block, the boundary to several blocks, and block counts limited by the SM count.
    #[test]
    #[allow(clippy::excessive_precision)] // torch's printed values, verbatim
    fn matches_torch_on_cuda_for_one_and_many_thread_blocks() {
        let measured = [
            (1_000, 1.5835859775543213f32),
            (4_608, 1.5897103548049927),
            (7_680, 1.5959779024124146),
            (8_192, 1.5971851348876953),
            (8_704, 1.5982201099395752),
            (16_384, 1.5976428985595703),
            (65_536, 1.5999313592910767),
            (100_000, 1.5998579263687134),
            (130_000, 1.599665880203247),
            (130_560, 1.59989595413208),
            (130_561, 1.5999051332473755),
            (600_000, 1.5999302864074707),
            (3_000_000, 1.5999943017959595),
            (20_000_000, 1.5999962091445923),
        ];
        for (n, mean) in measured {
            let xs: Vec<f32> = (0..n as u64)
                .map(|i| (((i * 7919) % 1_000_003) as f64 / 1_000_003.0 * 3.0 + 0.1) as f32)
                .collect();
            assert_eq!(torch_cuda_mean(&xs), mean, "n = {n}");
        }
    }

    #[derive(serde::Deserialize)]
    struct Fixture {
        cases: Vec<Case>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        /// float32 values, written as the doubles equal to them.
        values: Vec<f64>,
        mean: f64,
    }

    /// Vectors whose mean torch 2.11 computed on an H200: the absmax of the golden tiny
    /// checkpoints' weights and random ones of chosen lengths (see the fixture's README).
    #[test]
    fn reproduces_torch_on_cuda() {
        let fixture: Fixture = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/golden_extra/torch_cuda_mean.json"
        )))
        .expect("torch_cuda_mean.json parses");
        assert_eq!(fixture.cases.len(), 47);
        let mismatches: Vec<String> = fixture
            .cases
            .iter()
            .filter_map(|case| {
                let values: Vec<f32> = case.values.iter().map(|&v| v as f32).collect();
                let mean = torch_cuda_mean(&values);
                (mean.to_bits() != (case.mean as f32).to_bits())
                    .then(|| format!("{}: {mean:e} instead of {:e}", case.name, case.mean))
            })
            .collect();
        assert!(mismatches.is_empty(), "{mismatches:#?}");
    }

    #[test]
    fn launch_configuration_follows_aten() {
        assert_eq!(block_width(120), 64);
        assert_eq!(block_width(60), 32);
        assert_eq!(block_width(100_000), 512);
        assert_eq!(blocks_per_output(130_560, 512), 1);
        assert_eq!(blocks_per_output(130_561, 512), 16);
        assert_eq!(blocks_per_output(100_000_000, 512), 763);
    }
}
