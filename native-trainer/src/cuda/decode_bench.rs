//! `qlora bench generate`: 4-bit generation speed on a BLOOM-7b1-shaped model with random
//! weights (nf4 with double quantization, bf16), measured as `shared/anchors/hf_qlora_bench.py`
//! measures the reference stack's decoding (batch 1, greedy, a 32-token prompt, 64 new tokens,
//! prefill included), plus the steady decoding step against its memory-bandwidth floor, prefill
//! throughput, and an evaluation-shaped run (many prompts of given lengths in left-padded
//! batches, a fixed number of new tokens each).

use std::time::Instant;

use qlora_core::arch::{LoraConfig, TargetModules};
use qlora_core::Result;
use qlora_kernels::{GemvKernel, Gpu, Precision};

use super::bench::{bloom_7b1, median, Filler, RandomBase};
use super::model::{CudaModel, CudaOptions};
use crate::cpu::lora::{LoraInit, LoraSetup};
use crate::generate::{
    generate, generate_batch, GenerateOptions, Generator, Sampler, SamplingParams,
};

/// What to measure.
#[derive(Debug, Clone)]
pub struct GenerateBenchOptions {
    pub layers: usize,
    /// Tokens of the prompt whose prefill is timed.
    pub prefill_tokens: usize,
    /// The evaluation-shaped run: one prompt per length, in batches of `eval_batch`.
    pub eval_prompt_lengths: Vec<usize>,
    pub eval_batch: usize,
    pub eval_new_tokens: usize,
    pub adapter: BenchAdapter,
    /// The decoding GEMV of every measurement but `decode_step_other_gemv_ms`.
    pub gemv: GemvKernel,
}

/// The LoRA adapter measured with (r=16 on query_key_value): none, applied unmerged
/// (`predict`'s default), or folded into a bf16 copy of the weight (`predict --merge_adapter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchAdapter {
    None,
    Unmerged,
    Merged,
}

impl BenchAdapter {
    pub fn describe(self) -> &'static str {
        match self {
            BenchAdapter::None => "no adapter",
            BenchAdapter::Unmerged => "adapter unmerged",
            BenchAdapter::Merged => "adapter merged",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateBenchResult {
    pub lora: bool,
    pub merged_adapter: bool,
    /// As the anchor measures it: 64 new tokens after a 32-token prompt, prefill included.
    pub decode_tok_s_bs1: f64,
    /// One decoding step (batch 1), the median of 64.
    pub decode_step_ms: f64,
    /// The same with every kernel launched from the host (the step not recorded as a graph).
    pub decode_step_unrecorded_ms: f64,
    pub gemv: String,
    /// The step with the other decoding GEMV, and whether its 64 greedy tokens are the same.
    pub decode_step_other_gemv_ms: f64,
    pub other_gemv_same_tokens: bool,
    pub decode_bytes_per_token: usize,
    /// Device-to-device copy bandwidth measured in this run (bytes read + written per second).
    pub copy_bandwidth_gb_s: f64,
    /// Steps per second if a step only read its weights at the copy bandwidth.
    pub floor_tok_s: f64,
    pub fraction_of_floor: f64,
    pub prefill_tokens: usize,
    pub prefill_tok_s: f64,
    pub eval_examples: usize,
    pub eval_batch: usize,
    pub eval_new_tokens: usize,
    pub eval_examples_s: f64,
    pub eval_generated_tok_s: f64,
    pub peak_alloc_gib: f64,
}

fn random_ids(n: usize, seed: u64) -> Vec<u32> {
    let mut fill = Filler(seed);
    (0..n).map(|_| 4 + (fill.next() % 249_996) as u32).collect()
}

fn greedy() -> Sampler {
    Sampler::new(SamplingParams::GREEDY, 0).expect("greedy parameters are valid")
}

/// Bytes per second of a device-to-device copy of 1 GiB (read and written), the best of five.
fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let bytes = 1 << 30;
    let (a, b) = (
        gpu.alloc(bytes, "bandwidth test")?,
        gpu.alloc(bytes, "bandwidth test")?,
    );
    let mut best = f64::MAX;
    for _ in 0..5 {
        gpu.sync()?;
        let started = Instant::now();
        gpu.copy(b.ptr(), a.ptr(), bytes)?;
        gpu.sync()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(2.0 * bytes as f64 / best)
}

/// One steady decoding step at batch 1 after `prompt`: the median of 64, in seconds.
fn decode_step_s(generator: &dyn Generator, prompt: &[u32]) -> Result<f64> {
    let mut session = generator.session(1, prompt.len() + 65)?;
    let contexts = vec![prompt.to_vec()];
    let mask = vec![1.0; prompt.len()];
    let mut next = session.step(prompt, &mask, &mut greedy(), &contexts, &[true])?;
    let mut steps = Vec::with_capacity(64);
    for _ in 0..64 {
        let started = Instant::now();
        next = session.step(&next, &[1.0], &mut greedy(), &contexts, &[true])?;
        steps.push(started.elapsed().as_secs_f64());
    }
    Ok(median(&steps))
}

/// Measures `options` on `gpu`; `progress` hears what is being measured.
pub fn run(
    gpu: &Gpu,
    options: &GenerateBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<GenerateBenchResult> {
    let config = bloom_7b1(options.layers)?;
    let base = RandomBase::new(&config);
    let setup = LoraSetup {
        config: LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::Names(vec!["query_key_value".into()]),
        },
        init: LoraInit::Random { seed: 0 },
    };
    let mut model = CudaModel::load(
        gpu,
        &config,
        &base,
        (options.adapter != BenchAdapter::None).then_some(&setup),
        CudaOptions {
            precision: Precision::Bf16,
            gradient_checkpointing: false,
        },
    )?;
    model.prepare_decoding(options.adapter == BenchAdapter::Merged)?;
    model.kernels().set_gemv(options.gemv);
    progress("model loaded; measuring the copy bandwidth");
    let bandwidth = copy_bandwidth(gpu)?;
    gpu.reset_peak();
    let prompt = random_ids(32, 1);
    model.set_record_decoding(false);
    let unrecorded_step_s = decode_step_s(&model, &prompt)?;
    model.set_record_decoding(true);
    let generator: &dyn Generator = &model;
    let new_tokens = |n: usize| GenerateOptions {
        max_new_tokens: n,
        stop_ids: Vec::new(),
    };

    // As the anchor: warm up with 8 tokens, then 64 after a 32-token prompt.
    generate(generator, &prompt, &new_tokens(8), &mut greedy(), |_| false)?;
    let started = Instant::now();
    let out = generate(generator, &prompt, &new_tokens(64), &mut greedy(), |_| {
        false
    })?;
    let decode_tok_s_bs1 = out.len() as f64 / started.elapsed().as_secs_f64();
    progress(&format!("batch-1 decoding: {decode_tok_s_bs1:.0} tok/s"));

    let step_s = decode_step_s(generator, &prompt)?;
    // The tensor-core GEMV against the wide one (different rounding: the tokens may differ),
    // the wide one against the one-chunk one (the same bits).
    let other = match options.gemv {
        GemvKernel::OneChunk | GemvKernel::Tensor => GemvKernel::Wide,
        GemvKernel::Wide => GemvKernel::OneChunk,
    };
    model.kernels().set_gemv(other);
    let other_step_s = decode_step_s(generator, &prompt)?;
    let other_out = generate(generator, &prompt, &new_tokens(64), &mut greedy(), |_| {
        false
    })?;
    model.kernels().set_gemv(options.gemv);
    progress(&format!(
        "{other:?} GEMV: step {:.3} ms, the same tokens: {}",
        1e3 * other_step_s,
        other_out == out
    ));
    let bytes = model.decode_bytes_per_token();
    let floor_tok_s = bandwidth / bytes as f64;
    progress(&format!(
        "decoding step {:.3} ms ({:.3} ms unrecorded); floor {floor_tok_s:.0} tok/s ({bytes} bytes at {:.0} GB/s)",
        1e3 * step_s,
        1e3 * unrecorded_step_s,
        bandwidth / 1e9
    ));

    // Prefill: the median of three after one untimed (its first use of the prompt's shapes
    // allocates and picks GEMM algorithms).
    let long = random_ids(options.prefill_tokens, 2);
    let mask = vec![1.0; long.len()];
    let mut prefill_s = Vec::with_capacity(4);
    for _ in 0..4 {
        let mut session = generator.session(1, options.prefill_tokens + 1)?;
        gpu.sync()?;
        let started = Instant::now();
        session.step(
            &long,
            &mask,
            &mut greedy(),
            std::slice::from_ref(&long),
            &[true],
        )?;
        prefill_s.push(started.elapsed().as_secs_f64());
    }
    let prefill_tok_s = long.len() as f64 / median(&prefill_s[1..]);
    progress(&format!("prefill: {prefill_tok_s:.0} tok/s"));

    // Evaluation-shaped: every prompt, in order, in left-padded batches.
    let prompts: Vec<Vec<u32>> = options
        .eval_prompt_lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| random_ids(len.max(1), 100 + i as u64))
        .collect();
    let started = Instant::now();
    let mut generated = 0usize;
    for (i, chunk) in prompts.chunks(options.eval_batch.max(1)).enumerate() {
        if i % 16 == 0 {
            progress(&format!(
                "evaluation-shaped run: {} of {} prompts after {:.1} s",
                i * options.eval_batch,
                prompts.len(),
                started.elapsed().as_secs_f64()
            ));
        }
        let outputs = generate_batch(
            generator,
            chunk,
            &new_tokens(options.eval_new_tokens),
            &mut greedy(),
            |_, _| false,
        )?;
        generated += outputs.iter().map(Vec::len).sum::<usize>();
    }
    let eval_s = started.elapsed().as_secs_f64();
    let memory = gpu.memory()?;
    Ok(GenerateBenchResult {
        lora: options.adapter != BenchAdapter::None,
        merged_adapter: options.adapter == BenchAdapter::Merged,
        decode_tok_s_bs1,
        decode_step_ms: 1e3 * step_s,
        decode_step_unrecorded_ms: 1e3 * unrecorded_step_s,
        gemv: format!("{:?}", options.gemv),
        decode_step_other_gemv_ms: 1e3 * other_step_s,
        other_gemv_same_tokens: other_out == out,
        decode_bytes_per_token: bytes,
        copy_bandwidth_gb_s: bandwidth / 1e9,
        floor_tok_s,
        fraction_of_floor: 1.0 / step_s / floor_tok_s,
        prefill_tokens: long.len(),
        prefill_tok_s,
        eval_examples: prompts.len(),
        eval_batch: options.eval_batch,
        eval_new_tokens: options.eval_new_tokens,
        eval_examples_s: prompts.len() as f64 / eval_s,
        eval_generated_tok_s: generated as f64 / eval_s,
        peak_alloc_gib: memory.peak_bytes as f64 / (1u64 << 30) as f64,
    })
}
