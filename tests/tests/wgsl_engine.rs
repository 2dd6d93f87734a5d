//! The WGSL engine (qlora-shaders) against the CPU path (qlora-trainer's candle models) on the
//! golden tiny models, on whatever WebGPU adapter the machine has (lavapipe in CI):
//! - logits of every position within 1e-4 (relative to the largest) of the CPU forward, for
//!   full-precision checkpoints (f32 weights, or quantized to NF4 on load), the HF 4-bit
//!   checkpoints and with PEFT adapters applied unmerged;
//! - greedy generation of 32 tokens equal to the CPU path's;
//! - tensors split across buffers under a small binding limit give the same logits, and a
//!   limit too small for a weight is a clear error;
//! - a bf16 LM head (an option, off by default) takes fewer bytes and moves the logits by no
//!   more than bf16's precision.
//!
//! Skips, with the reason printed, only where no adapter exists. Run with `--nocapture` for the
//! figures.

use std::path::PathBuf;

use candle_core::{Device, IndexOp, Tensor};
use qlora_core::arch::ModelConfig;
use qlora_core::checkpoint::bnb4bit::Dequantizing;
use qlora_core::checkpoint::{open_checkpoint, open_file, BoxedSource, TensorSource};
use qlora_core::peft::LoraAdapter;
use qlora_core::quant::QuantType;
use qlora_shaders::device::request_adapter;
use qlora_shaders::{
    block_on, Engine, EngineOptions, GenerateOptions, LoadOptions, LoadedModel, QuantizeOnLoad,
    Sampling,
};
use qlora_trainer::cpu::{Mode, Model};
use qlora_trainer::generate::{generate, Sampler, SamplingParams};
use qlora_trainer::load::{quantize_on_read, QuantOnLoad};

const TOLERANCE: f32 = 1e-4;

fn golden(path: &str) -> PathBuf {
    qlora_tests::fixtures().join("golden").join(path)
}

/// An engine on the machine's adapter. Tests run one at a time (a lock): lavapipe crashes
/// when several devices work at once in one process.
fn engine(options: EngineOptions) -> Option<(Engine, std::sync::MutexGuard<'static, ()>)> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(adapter) = block_on(request_adapter()) else {
        eprintln!("skipped: no WebGPU adapter (install mesa-vulkan-drivers for lavapipe)");
        return None;
    };
    let engine = block_on(Engine::from_adapter(&adapter, options)).unwrap();
    println!("{}", engine.report());
    Some((engine, guard))
}

/// A golden model directory, optionally quantized on load and with an adapter directory.
struct Case {
    dir: &'static str,
    quantize: Option<QuantizeOnLoad>,
    adapter: Option<&'static str>,
}

impl Case {
    fn name(&self) -> String {
        let mut name = self.dir.to_string();
        if let Some(q) = self.quantize {
            name += &format!(" (quantized to {} on load)", q.quant_type);
        }
        if let Some(a) = self.adapter {
            name += &format!(" + {a}");
        }
        name
    }

    fn config(&self) -> ModelConfig {
        ModelConfig::load(&golden(self.dir).join("config.json")).unwrap()
    }

    /// The CPU model: a 4-bit checkpoint dequantized on read, a quantized-on-load one through
    /// the same quantizer.
    fn cpu(&self) -> Model {
        let config = self.config();
        let source = open_checkpoint(&golden(self.dir)).unwrap();
        let weights: BoxedSource = match (config.quantization.is_some(), self.quantize) {
            (true, _) => Box::new(Dequantizing::new(source)),
            (false, Some(q)) => quantize_on_read(
                &config,
                source,
                QuantOnLoad {
                    quant_type: q.quant_type,
                    double_quant: q.double_quant,
                    blocksize: q.blocksize,
                },
            )
            .unwrap(),
            (false, None) => source,
        };
        let adapter = self.adapter.map(golden);
        qlora_trainer::generate::model::load_model(&config, &weights, adapter.as_deref()).unwrap()
    }

    fn gpu(&self, engine: &Engine, options: &LoadOptions) -> qlora_core::Result<LoadedModel> {
        let source = open_checkpoint(&golden(self.dir)).unwrap();
        let adapter = self.adapter.map(|a| LoraAdapter::load(&golden(a)).unwrap());
        let options = LoadOptions {
            quantize: self.quantize,
            ..options.clone()
        };
        let mut tensors = 0;
        let model = engine.load(
            &self.config(),
            &source,
            adapter.as_ref(),
            &options,
            &mut |p| tensors = p.done,
        )?;
        assert!(tensors > 0, "the progress callback was not called");
        Ok(model)
    }
}

const NF4_ON_LOAD: QuantizeOnLoad = QuantizeOnLoad::QLORA;

fn cases() -> Vec<Case> {
    let case = |dir, quantize, adapter| Case {
        dir,
        quantize,
        adapter,
    };
    vec![
        case("tiny-bloom", None, None),
        case("tiny-bloom", Some(NF4_ON_LOAD), None),
        case("tiny-bloom-nf4", None, None),
        case("tiny-bloom-fp4", None, None),
        case("tiny-bloom", None, Some("tiny-bloom-lora")),
        case("tiny-bloom-nf4", None, Some("tiny-bloom-lora")),
        case("llama/tiny-llama", None, None),
        case("llama/tiny-llama-nf4", None, None),
        case("llama/tiny-llama-fp4", None, None),
        case("llama/tiny-llama", None, Some("llama/tiny-llama-lora")),
        case("llama/tiny-qwen2", None, None),
        case(
            "llama/tiny-qwen2",
            Some(QuantizeOnLoad {
                quant_type: QuantType::Fp4,
                blocksize: 128,
                double_quant: false,
            }),
            None,
        ),
        case("llama/tiny-qwen2-nf4", None, None),
        case("llama/tiny-qwen2-fp4", None, None),
        case("llama/tiny-qwen2-nf4", None, Some("llama/tiny-qwen2-lora")),
    ]
}

/// The real tokens of each row of the golden `input_ids` (padding dropped).
fn prompts(dir: &str) -> Vec<Vec<u32>> {
    let file = if dir.starts_with("llama/tiny-llama") {
        "llama/tiny-llama_reference.safetensors"
    } else if dir.starts_with("llama/tiny-qwen2") {
        "llama/tiny-qwen2_reference.safetensors"
    } else {
        "tiny_bloom_reference.safetensors"
    };
    let source = open_file(&golden(file)).unwrap();
    let read = |name: &str| -> Option<(Vec<i64>, Vec<usize>)> {
        let raw = source.read(name).ok()?;
        let v = raw
            .data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Some((v, raw.shape))
    };
    let (ids, shape) = read("input_ids").unwrap();
    let mask = read("attention_mask").map(|(m, _)| m);
    let t = shape[1];
    (0..shape[0])
        .map(|row| {
            (0..t)
                .filter(|&j| mask.as_ref().is_none_or(|m| m[row * t + j] == 1))
                .map(|j| ids[row * t + j] as u32)
                .collect()
        })
        .collect()
}

/// `[T, V]` logits of the CPU forward, flattened.
fn cpu_logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let ids = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &Device::Cpu).unwrap();
    let logits = model.forward(&ids, None, &mut Mode::Eval).unwrap();
    logits
        .i(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max |b|.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    max_diff / max_ref
}

#[test]
fn logits_match_the_cpu_path() {
    let Some((engine, _one_at_a_time)) = engine(EngineOptions::default()) else {
        return;
    };
    let mut worst = 0f32;
    for case in cases() {
        let cpu = case.cpu();
        let mut gpu = case.gpu(&engine, &LoadOptions::default()).unwrap();
        for prompt in prompts(case.dir) {
            let got = block_on(gpu.prefill(&prompt)).unwrap();
            let want = cpu_logits(&cpu, &prompt);
            let rel = relative_error(&got, &want);
            println!(
                "{}: {} tokens, relative logits error {rel:.2e}",
                case.name(),
                prompt.len()
            );
            assert!(rel <= TOLERANCE, "{}: {rel:e} > {TOLERANCE:e}", case.name());
            worst = worst.max(rel);
            // The cache continues the sequence: one more token gives the next position's logits.
            let next = prompt[0];
            let step = block_on(gpu.decode_step(next)).unwrap();
            let mut longer = prompt.clone();
            longer.push(next);
            let full = cpu_logits(&cpu, &longer);
            let rel = relative_error(&step, &full[prompt.len() * gpu.vocab_size()..]);
            assert!(rel <= TOLERANCE, "{} decode step: {rel:e}", case.name());
        }
    }
    println!("largest relative logits error: {worst:.2e}");
}

#[test]
fn greedy_generation_matches_the_cpu_path() {
    let Some((engine, _one_at_a_time)) = engine(EngineOptions::default()) else {
        return;
    };
    for case in cases() {
        let cpu = case.cpu();
        let mut gpu = case.gpu(&engine, &LoadOptions::default()).unwrap();
        let prompt = &prompts(case.dir)[0];
        let mut sampler = Sampler::new(SamplingParams::GREEDY, 0).unwrap();
        let cpu_options = qlora_trainer::generate::GenerateOptions {
            max_new_tokens: 32,
            stop_ids: Vec::new(),
        };
        let want = generate(&cpu, prompt, &cpu_options, &mut sampler, |_| false).unwrap();
        let mut streamed = 0;
        let got = block_on(gpu.generate(prompt, &GenerateOptions::greedy(32), |ids| {
            streamed = ids.len();
            false
        }))
        .unwrap();
        println!("{}: {:?}", case.name(), got);
        assert_eq!(got.len(), 32);
        assert_eq!(streamed, 32);
        assert_eq!(got, want, "{}", case.name());
    }
}

#[test]
fn split_tensors_give_the_same_logits() {
    // 16 KiB buffers: tiny BLOOM's embedding (and tied LM head, 128 KiB) in 8 parts, its f32
    // projections in up to 3.
    let Some((small, one_at_a_time)) = engine(EngineOptions {
        max_binding_size: Some(16 << 10),
    }) else {
        return;
    };
    let options = LoadOptions {
        quantize: None,
        max_seq_len: 64,
        chunk: 4,
        ..LoadOptions::default()
    };
    for dir in ["tiny-bloom", "llama/tiny-qwen2-nf4"] {
        let case = Case {
            dir,
            quantize: None,
            adapter: None,
        };
        let source = open_checkpoint(&golden(dir)).unwrap();
        let plan = small.plan(&case.config(), &source, &options).unwrap();
        let mut gpu = case.gpu(&small, &options).unwrap();
        let footprint = gpu.footprint().clone();
        println!("{dir}: planned {plan:?}, loaded {footprint:?}");
        assert!(
            !footprint.split_tensors.is_empty(),
            "{dir}: nothing was split"
        );
        // The plan, from the config alone, is what the load laid out.
        let sorted = |mut v: Vec<(String, usize)>| {
            v.sort();
            v
        };
        assert_eq!(plan.weight_bytes, footprint.weight_bytes);
        assert_eq!(plan.cache_bytes, footprint.cache_bytes);
        assert_eq!(sorted(plan.split_tensors), sorted(footprint.split_tensors));
        let cpu = case.cpu();
        for prompt in prompts(dir) {
            let got = block_on(gpu.prefill(&prompt)).unwrap();
            let rel = relative_error(&got, &cpu_logits(&cpu, &prompt));
            println!(
                "{dir} split, {} tokens in chunks of 4: relative logits error {rel:.2e}",
                prompt.len()
            );
            assert!(rel <= TOLERANCE, "{dir}: {rel:e}");
        }
    }
    // 1 KiB cannot hold a row of tiny BLOOM's attention scores nor its weights.
    drop(one_at_a_time);
    let Some((tiny, _one_at_a_time)) = engine(EngineOptions {
        max_binding_size: Some(1 << 10),
    }) else {
        return;
    };
    let case = Case {
        dir: "tiny-bloom-nf4",
        quantize: None,
        adapter: None,
    };
    let err = case
        .gpu(&tiny, &options)
        .err()
        .expect("a 1 KiB limit fits nothing")
        .to_string();
    println!("{err}");
    assert!(
        err.contains("needs a buffer of") && err.contains("binds at most 1024 bytes"),
        "{err}"
    );
}

#[test]
fn penalties_stops_and_seeded_sampling() {
    let Some((engine, _one_at_a_time)) = engine(EngineOptions::default()) else {
        return;
    };
    let case = Case {
        dir: "llama/tiny-qwen2-nf4",
        quantize: None,
        adapter: None,
    };
    let cpu = case.cpu();
    let mut gpu = case.gpu(&engine, &LoadOptions::default()).unwrap();
    let prompt = &prompts(case.dir)[0];
    let mut run =
        |options: &GenerateOptions| block_on(gpu.generate(prompt, options, |_| false)).unwrap();

    // Greedy with a repetition penalty, as the CPU path chooses.
    let penalized = GenerateOptions {
        sampling: Sampling {
            repetition_penalty: 1.3,
            ..Sampling::GREEDY
        },
        ..GenerateOptions::greedy(32)
    };
    let mut sampler = Sampler::new(
        SamplingParams {
            repetition_penalty: 1.3,
            ..SamplingParams::GREEDY
        },
        0,
    )
    .unwrap();
    let cpu_options = qlora_trainer::generate::GenerateOptions {
        max_new_tokens: 32,
        stop_ids: Vec::new(),
    };
    let want = generate(&cpu, prompt, &cpu_options, &mut sampler, |_| false).unwrap();
    let got = run(&penalized);
    println!("penalized greedy: {got:?}");
    assert_eq!(got, want);

    // A stop id ends generation before it.
    let greedy = run(&GenerateOptions::greedy(32));
    // A prompt longer than a chunk goes through in pieces; a full cache ends generation (the
    // last token chosen from the last cached position's logits).
    let mut small = case
        .gpu(
            &engine,
            &LoadOptions {
                chunk: 4,
                max_seq_len: prompt.len() + 5,
                ..LoadOptions::default()
            },
        )
        .unwrap();
    let limited =
        block_on(small.generate(prompt, &GenerateOptions::greedy(32), |_| false)).unwrap();
    assert_eq!(limited, greedy[..6]);
    let mut run =
        |options: &GenerateOptions| block_on(gpu.generate(prompt, options, |_| false)).unwrap();
    let stop = greedy[5];
    let first = greedy.iter().position(|&t| t == stop).unwrap();
    let stopped = run(&GenerateOptions {
        stop_ids: vec![stop],
        ..GenerateOptions::greedy(32)
    });
    assert_eq!(stopped, greedy[..first]);

    // Sampling: a seed reproduces a generation, another seed gives another.
    let sampled = |seed| GenerateOptions {
        max_new_tokens: 24,
        stop_ids: Vec::new(),
        sampling: Sampling {
            do_sample: true,
            temperature: 1.5,
            top_p: 0.95,
            top_k: 50,
            repetition_penalty: 1.1,
        },
        seed,
    };
    let a = run(&sampled(1));
    println!("sampled: {a:?}");
    assert_eq!(a, run(&sampled(1)));
    assert_ne!(a, run(&sampled(2)));
    assert!(a.iter().all(|&t| (t as usize) < 384));

    // With no new tokens the prompt is still cached (another prompt than the cache held
    // before): the next step continues it.
    let other = &prompts(case.dir)[1];
    let none = block_on(gpu.generate(other, &GenerateOptions::greedy(0), |_| false)).unwrap();
    assert!(none.is_empty());
    let step = block_on(gpu.decode_step(greedy[0])).unwrap();
    let mut longer = other.clone();
    longer.push(greedy[0]);
    let full = cpu_logits(&cpu, &longer);
    let rel = relative_error(&step, &full[other.len() * gpu.vocab_size()..]);
    assert!(
        rel <= TOLERANCE,
        "decode after an empty generation: {rel:e}"
    );

    // Greedy decoding runs each chosen token's pass before reading the token back; one that
    // ends at its token limit still leaves the cache at the prompt and every generated id but
    // the last, so the next step continues from there.
    let eight = block_on(gpu.generate(prompt, &GenerateOptions::greedy(8), |_| false)).unwrap();
    assert_eq!(eight, greedy[..8]);
    assert_eq!(gpu.cached_tokens(), prompt.len() + 7);
    let step = block_on(gpu.decode_step(eight[7])).unwrap();
    let mut continued = prompt.clone();
    continued.extend_from_slice(&eight);
    let full = cpu_logits(&cpu, &continued);
    let rel = relative_error(&step, &full[(continued.len() - 1) * gpu.vocab_size()..]);
    assert!(rel <= TOLERANCE, "decode after a generation: {rel:e}");
    // Seeded sampling without a penalty (also run ahead) reproduces too.
    let unpenalized = |seed| GenerateOptions {
        max_new_tokens: 24,
        stop_ids: Vec::new(),
        sampling: Sampling {
            do_sample: true,
            temperature: 1.5,
            ..Sampling::GREEDY
        },
        seed,
    };
    let mut run =
        |options: &GenerateOptions| block_on(gpu.generate(prompt, options, |_| false)).unwrap();
    let a = run(&unpenalized(1));
    assert_eq!(a, run(&unpenalized(1)));
    assert_ne!(a, run(&unpenalized(2)));
}

/// The HF 4-bit checkpoints against the logits transformers + bitsandbytes computed for them
/// (`reference_logits.safetensors`, the golden inputs; padded positions left out).
#[test]
fn four_bit_logits_match_transformers() {
    let Some((engine, _one_at_a_time)) = engine(EngineOptions::default()) else {
        return;
    };
    for dir in [
        "tiny-bloom-nf4",
        "tiny-bloom-fp4",
        "llama/tiny-llama-nf4",
        "llama/tiny-llama-fp4",
        "llama/tiny-qwen2-nf4",
        "llama/tiny-qwen2-fp4",
    ] {
        let case = Case {
            dir,
            quantize: None,
            adapter: None,
        };
        let mut gpu = case.gpu(&engine, &LoadOptions::default()).unwrap();
        let reference = open_file(&golden(dir).join("reference_logits.safetensors")).unwrap();
        let raw = reference.read("logits").unwrap();
        let want = raw.to_f32().unwrap();
        let (t, v) = (raw.shape[1], raw.shape[2]);
        let (mut got_all, mut want_all) = (Vec::new(), Vec::new());
        for (row, prompt) in prompts(dir).iter().enumerate() {
            got_all.extend(block_on(gpu.prefill(prompt)).unwrap());
            want_all.extend_from_slice(&want[row * t * v..(row * t + prompt.len()) * v]);
        }
        let rel = relative_error(&got_all, &want_all);
        println!("{dir}: relative logits error against transformers {rel:.2e}");
        assert!(rel <= TOLERANCE, "{dir}: {rel:e} > {TOLERANCE:e}");
    }
}

/// `dir`'s checkpoint with every float tensor cast to `dtype`, in a temporary directory.
fn cast_checkpoint(dir: &str, dtype: qlora_core::DType) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    std::fs::copy(
        golden(dir).join("config.json"),
        out.path().join("config.json"),
    )
    .unwrap();
    let source = open_checkpoint(&golden(dir)).unwrap();
    let plan: Vec<_> = source
        .tensor_infos()
        .into_iter()
        .map(|i| qlora_core::checkpoint::TensorInfo { dtype, ..i })
        .collect();
    let mut writer = qlora_core::checkpoint::SafetensorsWriter::create(
        &out.path().join("model.safetensors"),
        &plan,
    )
    .unwrap();
    for info in &plan {
        let values = source.read(&info.name).unwrap().to_f32().unwrap();
        writer
            .write_tensor(&info.name, &qlora_core::dtype::from_f32(dtype, &values))
            .unwrap();
    }
    writer.commit().unwrap();
    out
}

/// Half-precision checkpoints stay half precision on the device (widened exactly in the
/// kernels), or are quantized from their own dtype as `QuantizeOnRead` does.
/// A bf16 LM head (`LoadOptions::bf16_lm_head`) moves each logit by about bf16's precision.
const BF16_HEAD_TOLERANCE: f32 = 1e-2;

#[test]
fn a_bf16_lm_head_takes_fewer_bytes_and_keeps_the_logits_within_bf16_precision() {
    let Some((engine, _one_at_a_time)) = engine(EngineOptions::default()) else {
        return;
    };
    let bf16_head = LoadOptions {
        bf16_lm_head: true,
        ..LoadOptions::default()
    };
    // BLOOM's head is tied to the embedding; tiny-llama's is its own tensor.
    for dir in ["tiny-bloom", "llama/tiny-llama"] {
        let case = Case {
            dir,
            quantize: None,
            adapter: None,
        };
        let config = case.config();
        let source = open_checkpoint(&golden(dir)).unwrap();
        let plan = engine.plan(&config, &source, &bf16_head).unwrap();
        let f32_plan = engine
            .plan(&config, &source, &LoadOptions::default())
            .unwrap();
        let vocab_by_hidden = (config.vocab_size() * config.hidden_size()) as u64;
        assert!(f32_plan.weight_bytes - plan.weight_bytes >= 2 * vocab_by_hidden - 16);
        let mut gpu = case.gpu(&engine, &bf16_head).unwrap();
        assert_eq!(plan.weight_bytes, gpu.footprint().weight_bytes);
        let cpu = case.cpu();
        for prompt in prompts(dir) {
            let got = block_on(gpu.prefill(&prompt)).unwrap();
            let rel = relative_error(&got, &cpu_logits(&cpu, &prompt));
            println!("{dir} with a bf16 LM head: relative logits error {rel:.2e}");
            assert!(rel <= BF16_HEAD_TOLERANCE, "{dir}: {rel:e}");
        }
    }
}

#[test]
fn half_precision_checkpoints_match_the_cpu_path() {
    let Some((engine, _one_at_a_time)) = engine(EngineOptions::default()) else {
        return;
    };
    for (dir, dtype) in [
        ("tiny-bloom", qlora_core::DType::F16),
        ("llama/tiny-qwen2", qlora_core::DType::BF16),
    ] {
        let cast = cast_checkpoint(dir, dtype);
        let config = ModelConfig::load(&cast.path().join("config.json")).unwrap();
        let source = open_checkpoint(cast.path()).unwrap();
        for quantize in [None, Some(NF4_ON_LOAD)] {
            let cpu_weights: BoxedSource = match quantize {
                None => open_checkpoint(cast.path()).unwrap(),
                Some(q) => quantize_on_read(
                    &config,
                    open_checkpoint(cast.path()).unwrap(),
                    QuantOnLoad {
                        quant_type: q.quant_type,
                        double_quant: q.double_quant,
                        blocksize: q.blocksize,
                    },
                )
                .unwrap(),
            };
            let cpu = Model::load(&config, &cpu_weights, None).unwrap();
            let options = LoadOptions {
                quantize,
                ..LoadOptions::default()
            };
            let plan = engine.plan(&config, &source, &options).unwrap();
            let mut gpu = engine
                .load(&config, &source, None, &options, &mut |_| {})
                .unwrap();
            assert_eq!(plan.weight_bytes, gpu.footprint().weight_bytes);
            // Half the bytes of f32 for the embedding (and the LM head, the projections).
            let f32_plan = engine
                .plan(&config, &open_checkpoint(&golden(dir)).unwrap(), &options)
                .unwrap();
            assert!(plan.weight_bytes < f32_plan.weight_bytes * 3 / 4);
            for prompt in prompts(dir) {
                let got = block_on(gpu.prefill(&prompt)).unwrap();
                let rel = relative_error(&got, &cpu_logits(&cpu, &prompt));
                println!(
                    "{dir} as {dtype}, quantize {:?}: {} bytes of weights, relative logits error {rel:.2e}",
                    quantize.map(|q| q.quant_type),
                    plan.weight_bytes
                );
                assert!(rel <= TOLERANCE, "{dir} {dtype}: {rel:e}");
            }
        }
    }
}

#[test]
fn an_adapter_switched_off_gives_the_base_models_logits() {
    let Some((engine, _one_at_a_time)) = engine(EngineOptions::default()) else {
        return;
    };
    for (dir, adapter) in [
        ("tiny-bloom-nf4", "tiny-bloom-lora"),
        ("llama/tiny-qwen2-nf4", "llama/tiny-qwen2-lora"),
    ] {
        let case = |adapter| Case {
            dir,
            quantize: None,
            adapter,
        };
        let options = LoadOptions::default();
        let mut base = case(None).gpu(&engine, &options).unwrap();
        let mut tuned = case(Some(adapter)).gpu(&engine, &options).unwrap();
        for prompt in prompts(dir) {
            let with_adapter = block_on(tuned.prefill(&prompt)).unwrap();
            tuned.set_adapter_enabled(false);
            let switched_off = block_on(tuned.prefill(&prompt)).unwrap();
            tuned.set_adapter_enabled(true);
            let on_again = block_on(tuned.prefill(&prompt)).unwrap();
            let base_logits = block_on(base.prefill(&prompt)).unwrap();
            // The same kernels on the same weights: equal bit for bit.
            assert_eq!(switched_off, base_logits, "{dir}: adapter off");
            assert_eq!(on_again, with_adapter, "{dir}: adapter on again");
            let changed = relative_error(&with_adapter, &base_logits);
            assert!(
                changed > 1e-4,
                "{dir}: the adapter changes nothing ({changed:e})"
            );
        }
    }
}
