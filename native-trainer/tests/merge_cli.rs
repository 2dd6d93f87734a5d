//! `qlora merge` as a user runs it, on the golden tiny models and adapters (made by
//! transformers + PEFT, see tests/fixtures/golden/README.md). The fixtures have no tokenizer, so
//! each base is copied with a small word-level one.
//!
//! Run with `--nocapture` to see the figures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use qlora_core::arch::ModelConfig;
use qlora_core::checkpoint::bnb4bit::Dequantizing;
use qlora_core::checkpoint::{open_checkpoint, SafetensorsFile, TensorSource};
use qlora_core::inspect::Sqnr;
use qlora_core::peft::LoraAdapter;
use qlora_core::quant::QuantType;
use qlora_core::tokenizer::Tokenizer;
use qlora_trainer::cpu::{Mode, Model};
use qlora_trainer::generate::model::load_model;
use qlora_trainer::merge::report::MergeReport;
use qlora_trainer::merge::MergedWeights;
use serde_json::Value;

fn golden(path: &str) -> PathBuf {
    qlora_tests::fixtures().join("golden").join(path)
}

/// A copy of the model directory `source` with a word-level tokenizer over its whole vocabulary:
/// `<unk>`, `</s>` (EOS), a few words, then `w<id>`.
fn with_tokenizer(source: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config = ModelConfig::load(&source.join("config.json")).unwrap();
    let vocab_size = config.raw["vocab_size"].as_u64().unwrap() as usize;
    let words = ["<unk>", "</s>", "the", "sea", "is", "blue", "red", "dress"];
    let tokens = (0..vocab_size).map(|id| {
        words
            .get(id)
            .map_or_else(|| format!("w{id}"), |w| w.to_string())
    });
    qlora_tests::write_word_level_tokenizer(dir.path(), tokens, 2);
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"eos_token": "</s>", "unk_token": "<unk>"}"#,
    )
    .unwrap();
    dir
}

fn merge(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .arg("merge")
        .arg("--model_name_or_path")
        .arg(base)
        .arg("--adapter")
        .arg(adapter)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("qlora runs")
}

fn succeeded(output: Output) -> Output {
    assert!(
        output.status.success(),
        "qlora failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn read_report(out: &Path) -> MergeReport {
    let text = std::fs::read_to_string(out.join("merge_report.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The model in the checkpoint directory `dir` (a 4-bit one dequantized), without adapter.
fn load_checkpoint(dir: &Path) -> Model {
    let config = ModelConfig::load(&dir.join("config.json")).unwrap();
    let source = open_checkpoint(dir).unwrap();
    if config.quantization.is_some() {
        Model::load(&config, &Dequantizing::new(source), None).unwrap()
    } else {
        Model::load(&config, &source, None).unwrap()
    }
}

/// Base + adapter, unmerged, as generation loads them.
fn load_unmerged(base: &Path, adapter: &Path) -> Model {
    let config = ModelConfig::load(&base.join("config.json")).unwrap();
    let source = open_checkpoint(base).unwrap();
    load_model(&config, &source, Some(adapter)).unwrap()
}

fn logits(model: &Model, ids: &Tensor, mask: Option<&Tensor>) -> Vec<f32> {
    model
        .forward(ids, mask, &mut Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn i64_tensor(file: &SafetensorsFile, name: &str) -> Tensor {
    let raw = file.read(name).unwrap();
    let values: Vec<i64> = raw
        .data
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Tensor::from_vec(values, raw.shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0.0, f64::max)
}

fn max_abs(a: &[f32]) -> f64 {
    a.iter().map(|&x| (x as f64).abs()).fold(0.0, f64::max)
}

/// (base, adapter, reference file with `input_ids` and maybe `attention_mask`).
const GOLDEN: [(&str, &str, &str); 3] = [
    (
        "tiny-bloom",
        "tiny-bloom-lora",
        "tiny_bloom_reference.safetensors",
    ),
    (
        "llama/tiny-llama",
        "llama/tiny-llama-lora",
        "llama/tiny-llama_reference.safetensors",
    ),
    (
        "llama/tiny-qwen2",
        "llama/tiny-qwen2-lora",
        "llama/tiny-qwen2_reference.safetensors",
    ),
];

#[test]
fn golden_adapters_merged_to_fp32_give_the_unmerged_logits() {
    for (base, adapter, reference) in GOLDEN {
        let base_dir = with_tokenizer(&golden(base));
        let adapter = golden(adapter);
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("merged");
        let output = succeeded(merge(base_dir.path(), &adapter, &out, &["--dtype", "fp32"]));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("all prompts"), "{stdout}");

        let reference = SafetensorsFile::open(&golden(reference)).unwrap();
        let ids = i64_tensor(&reference, "input_ids");
        let mask = reference
            .tensor_infos()
            .iter()
            .any(|i| i.name == "attention_mask")
            .then(|| i64_tensor(&reference, "attention_mask"));
        let unmerged = logits(
            &load_unmerged(base_dir.path(), &adapter),
            &ids,
            mask.as_ref(),
        );
        let merged = logits(&load_checkpoint(&out), &ids, mask.as_ref());
        let rel = max_abs_diff(&merged, &unmerged) / max_abs(&unmerged);
        println!("{base} + adapter merged to fp32: logits rel. error {rel:.3e}");
        assert!(rel <= 1e-5, "{base}: rel. error {rel:e}");

        // The merge changed the weights (the adapter is not a no-op) and wrote float32.
        let base_model = load_checkpoint(base_dir.path());
        let plain = logits(&base_model, &ids, mask.as_ref());
        assert!(max_abs_diff(&plain, &unmerged) > 1e3 * max_abs_diff(&merged, &unmerged));
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert!(config.get("quantization_config").is_none());
        assert_eq!(config["dtype"], "float32");
        assert!(out.join("tokenizer.json").is_file());
        let report = read_report(&out);
        assert_eq!(report.output_format, "float32");
        assert!(report.requantization.is_none());
        assert_eq!(report.scale, 2.0);
        let adapted = LoraAdapter::load(&adapter).unwrap().modules.len();
        assert_eq!(report.merged_weights.len(), adapted);
        assert_eq!(report.logits.prompts.len(), 3);
        assert_eq!(report.logits.top1_agreement, 1.0);
        println!(
            "  report: max|diff| {:.3e}, mean|diff| {:.3e} on the default prompts",
            report.logits.max_abs_diff, report.logits.mean_abs_diff
        );
    }
}

/// Reads every float of `name` in `source`.
fn floats(source: &dyn TensorSource, name: &str) -> Vec<f32> {
    source.read(name).unwrap().to_f32().unwrap()
}

#[test]
fn nf4_merge_writes_what_quantize_writes_and_reports_the_numbers_it_gives() {
    let base = with_tokenizer(&golden("llama/tiny-llama"));
    let adapter = golden("llama/tiny-llama-lora");
    let work = tempfile::tempdir().unwrap();
    let prompts = work.path().join("prompts.txt");
    std::fs::write(&prompts, "the sea is blue\n\nred dress w40 w41 w300\n").unwrap();
    let quant = ["--quan", "nf4", "--double_quant", "--blocksize", "64"];

    let fp32 = work.path().join("fp32");
    succeeded(merge(base.path(), &adapter, &fp32, &["--dtype", "fp32"]));
    let nf4 = work.path().join("nf4");
    let extra: Vec<&str> = quant
        .iter()
        .copied()
        .chain(["--prompts", prompts.to_str().unwrap()])
        .collect();
    succeeded(merge(base.path(), &adapter, &nf4, &extra));

    // One writer: `qlora quantize` of the fp32 merge gives the same files byte for byte.
    let quantized = work.path().join("quantized");
    succeeded(
        Command::new(env!("CARGO_BIN_EXE_qlora"))
            .arg("quantize")
            .arg("--model_name_or_path")
            .arg(&fp32)
            .arg("--out")
            .arg(&quantized)
            .args(quant)
            .output()
            .unwrap(),
    );
    for file in ["model.safetensors", "config.json"] {
        assert_eq!(
            std::fs::read(nf4.join(file)).unwrap(),
            std::fs::read(quantized.join(file)).unwrap(),
            "{file}"
        );
    }

    // The merged fp32 weights are W + (alpha / r)·B·A, computed here in f64.
    let adapter_model = LoraAdapter::load(&adapter).unwrap();
    let base_source = open_checkpoint(base.path()).unwrap();
    let fp32_source = open_checkpoint(&fp32).unwrap();
    for (module, pair) in &adapter_model.modules {
        let name = format!("{module}.weight");
        let w = floats(&base_source, &name);
        let merged = floats(&fp32_source, &name);
        for o in 0..pair.out_features {
            for i in 0..pair.in_features {
                let delta: f64 = (0..pair.r)
                    .map(|k| {
                        pair.b[o * pair.r + k] as f64 * pair.a[k * pair.in_features + i] as f64
                    })
                    .sum();
                let expected = w[o * pair.in_features + i] as f64 + 2.0 * delta;
                let got = merged[o * pair.in_features + i] as f64;
                assert!(
                    (got - expected).abs() <= 1e-6 * (1.0 + expected.abs()),
                    "{name}"
                );
            }
        }
    }

    // The re-quantization statistics are those of the fp32 merge against the written nf4 file.
    let report = read_report(&nf4);
    assert_eq!(report.output_format, "nf4");
    let requant = report.requantization.as_ref().unwrap();
    let nf4_source = Dequantizing::new(open_checkpoint(&nf4).unwrap());
    let description = ModelConfig::load(&fp32.join("config.json"))
        .unwrap()
        .describe();
    assert_eq!(requant.tensors.len(), description.linears().len());
    let (mut signal, mut noise) = (0.0f64, 0.0f64);
    println!(
        "{:<44} {:>11} {:>11} {:>8}",
        "tensor", "MSE", "max|err|", "SQNR dB"
    );
    for t in &requant.tensors {
        let w = floats(&fp32_source, &t.name);
        let q = nf4_source.quantized(&t.name).unwrap().unwrap();
        assert_eq!(
            (q.quant_type, q.blocksize, q.shape.clone()),
            (QuantType::Nf4, 64, t.shape.clone())
        );
        let d = floats(&nf4_source, &t.name);
        let (mut s, mut n, mut max) = (0.0f64, 0.0f64, 0.0f64);
        for (&w, &d) in w.iter().zip(&d) {
            let e = w as f64 - d as f64;
            s += (w as f64).powi(2);
            n += e * e;
            max = max.max(e.abs());
        }
        let reported = &t.configs[0];
        let mse = n / w.len() as f64;
        let sqnr = 10.0 * (s / n).log10();
        println!("{:<44} {mse:>11.4e} {max:>11.4e} {sqnr:>8.2}", t.name);
        assert!((reported.mse - mse).abs() <= 1e-9 * mse, "{}", t.name);
        assert!(
            (reported.max_abs_error - max).abs() <= 1e-12 * max,
            "{}",
            t.name
        );
        let Sqnr::Db(db) = reported.sqnr else {
            panic!("{}: {:?}", t.name, reported.sqnr)
        };
        assert!((db - sqnr).abs() < 1e-9, "{}", t.name);
        signal += s;
        noise += n;
    }
    let Sqnr::Db(total) = requant.totals[0].sqnr else {
        panic!("{:?}", requant.totals[0].sqnr)
    };
    let expected_total = 10.0 * (signal / noise).log10();
    println!("all linear weights: SQNR {total:.3} dB");
    assert!((total - expected_total).abs() < 1e-9);

    // The logit figures are those of base + adapter against the written nf4 model.
    let tokenizer = Tokenizer::from_hf_dir(base.path()).unwrap();
    let unmerged = load_unmerged(base.path(), &adapter);
    let merged = load_checkpoint(&nf4);
    let lines = ["the sea is blue", "red dress w40 w41 w300"];
    assert_eq!(report.logits.prompts.len(), lines.len());
    for (line, reported) in lines.iter().zip(&report.logits.prompts) {
        let ids = tokenizer.encode(line, true).unwrap();
        let tokens = ids.len();
        let ids = Tensor::from_vec(ids, (1, tokens), &Device::Cpu).unwrap();
        let (u, m) = (logits(&unmerged, &ids, None), logits(&merged, &ids, None));
        let vocab = u.len() / tokens;
        let max = max_abs_diff(&u, &m);
        let mean = u
            .iter()
            .zip(&m)
            .map(|(&x, &y)| (x as f64 - y as f64).abs())
            .sum::<f64>()
            / u.len() as f64;
        let argmax = |row: &[f32]| {
            (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
        };
        let agree = u
            .chunks(vocab)
            .zip(m.chunks(vocab))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count() as f64
            / tokens as f64;
        println!(
            "{line:<28} tokens {tokens}: max|diff| {max:.4e}, mean|diff| {mean:.4e}, top-1 {:.0}%",
            agree * 100.0
        );
        assert_eq!(reported.prompt, *line);
        assert_eq!(reported.tokens, tokens);
        assert!((reported.max_abs_diff - max).abs() <= 1e-6 * max, "{line}");
        assert!(
            (reported.mean_abs_diff - mean).abs() <= 1e-6 * mean,
            "{line}"
        );
        assert_eq!(reported.top1_agreement, agree, "{line}");
        assert!(max > 0.0, "re-quantization changed nothing");
    }
}

#[test]
fn a_4bit_base_is_dequantized_before_merging() {
    let base = with_tokenizer(&golden("llama/tiny-llama-nf4"));
    let adapter = golden("llama/tiny-llama-lora");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("merged");
    let output = succeeded(merge(base.path(), &adapter, &out, &[]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is a 4-bit checkpoint"), "{stderr}");
    let report = read_report(&out);
    assert!(report.base_was_4bit);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none());
    println!(
        "nf4 base + adapter merged to full precision: logits max|diff| {:.3e}",
        report.logits.max_abs_diff
    );
    assert!(report.logits.max_abs_diff < 1e-4);
    assert_eq!(report.logits.top1_agreement, 1.0);
}

/// A copy of the adapter directory `source` with its config changed by `edit` and
/// `adapter_model.safetensors` left out when `weights` is false.
fn edited_adapter(
    source: &Path,
    edit: impl FnOnce(&mut Value),
    weights: bool,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    if weights {
        std::fs::copy(
            source.join("adapter_model.safetensors"),
            dir.path().join("adapter_model.safetensors"),
        )
        .unwrap();
    }
    dir
}

#[test]
fn errors_exit_non_zero_and_leave_nothing_in_out() {
    let bloom = with_tokenizer(&golden("tiny-bloom"));
    let llama = with_tokenizer(&golden("llama/tiny-llama"));
    let bloom_lora = golden("tiny-bloom-lora");
    let no_weights = edited_adapter(&bloom_lora, |_| {}, false);
    let rank = edited_adapter(&bloom_lora, |c| c["r"] = 8.into(), true);
    let untargeted = edited_adapter(
        &bloom_lora,
        |c| c["target_modules"] = serde_json::json!(["dense"]),
        true,
    );
    let unpaired = edited_adapter(
        &bloom_lora,
        |c| c["target_modules"] = serde_json::json!(["query_key_value", "dense"]),
        true,
    );
    let cases: [(&Path, &Path, &str); 5] = [
        (bloom.path(), no_weights.path(), "adapter_model.safetensors"),
        (llama.path(), &bloom_lora, "match no linear projection"),
        (bloom.path(), rank.path(), "the config says r = 8"),
        (bloom.path(), untargeted.path(), "do not name"),
        (
            bloom.path(),
            unpaired.path(),
            "self_attention.dense.lora_A.weight",
        ),
    ];
    for (base, adapter, message) in cases {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("merged");
        let output = merge(base, adapter, &out, &["--quan", "nf4"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{message}: succeeded");
        assert!(
            stderr.contains(message),
            "expected {message:?} in: {stderr}"
        );
        assert!(!out.exists(), "{message}: {} was written", out.display());
        assert_eq!(
            std::fs::read_dir(work.path()).unwrap().count(),
            0,
            "{message}"
        );
    }
}

#[test]
fn a_pair_whose_shape_is_not_the_weights_is_refused_by_name() {
    let base_dir = golden("tiny-bloom");
    let config = ModelConfig::load(&base_dir.join("config.json")).unwrap();
    let base = open_checkpoint(&base_dir).unwrap();
    let mut adapter = LoraAdapter::load(&golden("tiny-bloom-lora")).unwrap();
    let module = "transformer.h.1.self_attention.query_key_value";
    let pair = adapter.modules.get_mut(module).unwrap();
    // A [r, 32] for a weight with 64 inputs.
    pair.in_features = 32;
    pair.a.truncate(pair.r * 32);
    let Err(err) = MergedWeights::new(&config, &base, &adapter, "a.safetensors") else {
        panic!("a mis-shaped pair was accepted");
    };
    let msg = err.to_string();
    assert!(
        msg.contains("a.safetensors")
            && msg.contains(&format!("{module}.lora_A.weight"))
            && msg.contains("[192, 32]")
            && msg.contains("[192, 64]"),
        "{msg}"
    );
}
