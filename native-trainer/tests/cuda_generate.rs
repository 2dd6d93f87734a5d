//! CUDA generation against the CPU path on the golden tiny models (BLOOM, LLaMA, Qwen2; nf4 and
//! fp4 checkpoints, so every projection takes the fused 4-bit GEMV while decoding; with and
//! without their LoRA adapters, unmerged and merged):
//! - greedy, 32 new tokens: in the f32 check mode the ids equal the CPU's full-re-evaluation
//!   reference ([`greedy_reference`]) exactly, with and without a repetition penalty (applied on
//!   the GPU); bf16 reports how many leading tokens agree;
//! - a left-padded batch of three prompts gives each row its batch-1 answer.
//!
//! Skipped, with a printed reason, where no CUDA device opens. `QLORA_FIXTURES` overrides the
//! fixtures directory (for a test binary run on another machine).

use std::path::PathBuf;

use qlora_core::arch::ModelConfig;
use qlora_core::checkpoint::bnb4bit::Dequantizing;
use qlora_core::checkpoint::open_checkpoint;
use qlora_trainer::cpu::Model;
use qlora_trainer::cuda::{CudaModel, Gpu, Precision};
use qlora_trainer::generate::model::{load_cuda_model, load_model};
use qlora_trainer::generate::{
    generate, generate_batch, greedy_reference, GenerateOptions, Generator, Sampler, SamplingParams,
};

mod common;
use common::{golden, gpu};

const MODELS: [(&str, &str); 6] = [
    ("tiny-bloom-nf4", "tiny-bloom-lora"),
    ("tiny-bloom-fp4", "tiny-bloom-lora"),
    ("llama/tiny-llama-nf4", "llama/tiny-llama-lora"),
    ("llama/tiny-llama-fp4", "llama/tiny-llama-lora"),
    ("llama/tiny-qwen2-nf4", "llama/tiny-qwen2-lora"),
    ("llama/tiny-qwen2-fp4", "llama/tiny-qwen2-lora"),
];

const NEW_TOKENS: usize = 32;

fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    [
        vec![5u32, 17, 42, 99, 3, 250, 77, 8, 120],
        vec![11, 300, 7],
        vec![64, 65, 66, 67, 68],
    ]
    .into_iter()
    .map(|p| p.into_iter().map(|id| id % vocab).collect())
    .collect()
}

struct Loaded {
    cpu: Model,
    config: ModelConfig,
    dir: PathBuf,
    adapter: Option<PathBuf>,
}

fn load(model: &str, adapter: Option<&str>) -> Loaded {
    let dir = golden(model);
    let config = ModelConfig::load(&dir.join("config.json")).unwrap();
    // The CPU path reads the 4-bit checkpoint dequantized.
    let weights = Dequantizing::new(open_checkpoint(&dir).unwrap());
    let adapter = adapter.map(golden);
    Loaded {
        cpu: load_model(&config, &weights, adapter.as_deref()).unwrap(),
        config,
        dir,
        adapter,
    }
}

/// The CUDA model of `loaded`, its adapter merged when `merge`.
fn cuda_model(gpu: &Gpu, loaded: &Loaded, precision: Precision, merge: bool) -> CudaModel {
    // The wrapper hands the CUDA loader the packed weights (it asks for them first).
    let weights = Dequantizing::new(open_checkpoint(&loaded.dir).unwrap());
    load_cuda_model(
        gpu,
        &loaded.config,
        &weights,
        loaded.adapter.as_deref(),
        precision,
        merge,
    )
    .unwrap()
}

fn greedy(penalty: f32) -> Sampler {
    Sampler::new(
        SamplingParams {
            repetition_penalty: penalty,
            ..SamplingParams::GREEDY
        },
        0,
    )
    .unwrap()
}

fn options() -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: NEW_TOKENS,
        stop_ids: Vec::new(),
    }
}

fn agreeing_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[test]
fn greedy_generation_equals_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    for (model, adapter) in MODELS {
        for adapter in [None, Some(adapter)] {
            let loaded = load(model, adapter);
            let vocab = loaded.cpu.vocab_size() as u32;
            let merges: &[bool] = if adapter.is_some() {
                &[false, true]
            } else {
                &[false]
            };
            for penalty in [1.0f32, 1.3] {
                let references: Vec<Vec<u32>> = prompts(vocab)
                    .iter()
                    .map(|p| greedy_reference(&loaded.cpu, p, NEW_TOKENS, penalty, &[]).unwrap())
                    .collect();
                for &merge in merges {
                    for precision in [Precision::F32, Precision::Bf16] {
                        let cuda = cuda_model(&gpu, &loaded, precision, merge);
                        let name = format!(
                            "{model} adapter={} merge={merge} penalty={penalty} {precision:?}",
                            adapter.is_some()
                        );
                        for (prompt, reference) in prompts(vocab).iter().zip(&references) {
                            let ours = generate(
                                &cuda as &dyn Generator,
                                prompt,
                                &options(),
                                &mut greedy(penalty),
                                |_| false,
                            )
                            .unwrap();
                            let agree = agreeing_prefix(&ours, reference);
                            println!(
                                "{name} prompt of {}: {agree}/{NEW_TOKENS} agree",
                                prompt.len()
                            );
                            if precision == Precision::F32 {
                                assert_eq!(&ours, reference, "{name}");
                            }
                        }
                        if precision == Precision::F32 && penalty == 1.0 {
                            // The batch (left-padded) gives every row its batch-1 answer.
                            let batch = generate_batch(
                                &cuda as &dyn Generator,
                                &prompts(vocab),
                                &options(),
                                &mut greedy(penalty),
                                |_, _| false,
                            )
                            .unwrap();
                            assert_eq!(&batch, &references, "{name} batched");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn sampling_on_the_gpu_path_draws_like_the_cpu_path() {
    let Some(gpu) = gpu() else { return };
    let loaded = load("llama/tiny-llama-nf4", Some("llama/tiny-llama-lora"));
    let cuda = cuda_model(&gpu, &loaded, Precision::F32, false);
    let params = SamplingParams {
        do_sample: true,
        temperature: 0.8,
        top_p: 0.9,
        top_k: 40,
        repetition_penalty: 1.1,
    };
    let prompt = &prompts(loaded.cpu.vocab_size() as u32)[0];
    let run = |model: &dyn Generator| {
        let mut sampler = Sampler::new(params, 7).unwrap();
        generate(model, prompt, &options(), &mut sampler, |_| false).unwrap()
    };
    let (cpu, ours) = (run(&loaded.cpu), run(&cuda));
    println!(
        "sampled: {}/{NEW_TOKENS} agree",
        agreeing_prefix(&ours, &cpu)
    );
    assert_eq!(ours, cpu);
}
