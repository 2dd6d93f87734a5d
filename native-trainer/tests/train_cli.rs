//! `qlora train` end to end on the golden tiny BLOOM (given a small word-level tokenizer): the
//! loss falls, the adapters are PEFT directories, the log parses, runs are reproducible, and bad
//! input fails with a message.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qlora_core::arch::TargetModules;
use qlora_core::peft::LoraAdapter;
use serde_json::{json, Value};

const COLORS: [&str; 5] = ["red", "blue", "green", "black", "white"];
const ITEMS: [&str; 4] = ["shirt", "coat", "skirt", "hat"];
const WORDS: [&str; 7] = ["color", "item", "a", "that", "looks", "great", "="];

fn tiny_bloom() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden/tiny-bloom")
}

/// A copy of the tiny BLOOM with a word-level tokenizer whose special ids match its config
/// (bos 1, eos 2, pad 3), and train / validation data it can tokenize.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        for file in ["config.json", "generation_config.json", "model.safetensors"] {
            std::fs::copy(tiny_bloom().join(file), model.join(file)).unwrap();
        }
        let specials = ["<unk>", "<s>", "</s>", "<pad>"];
        let vocab: serde_json::Map<String, Value> = specials
            .iter()
            .chain(&COLORS)
            .chain(&ITEMS)
            .chain(&WORDS)
            .enumerate()
            .map(|(id, w)| (w.to_string(), json!(id)))
            .collect();
        let added: Vec<Value> = specials
            .iter()
            .enumerate()
            .map(|(id, t)| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let config = json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                            "unk_token": "<unk>"});
        std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();

        let record = |i: usize| {
            let (color, item) = (COLORS[i % 5], ITEMS[(i / 5) % 4]);
            json!({"content": format!("color {color} item {item}"),
                   "summary": format!("a {color} {item} that looks great")})
            .to_string()
        };
        let lines =
            |range: std::ops::Range<usize>| range.map(record).collect::<Vec<_>>().join("\n") + "\n";
        std::fs::write(dir.path().join("train.jsonl"), lines(0..20)).unwrap();
        std::fs::write(dir.path().join("dev.jsonl"), lines(3..11)).unwrap();
        Setup { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// `qlora train` on this setup into `out`, with `extra` flags.
    fn train(&self, out: &str, extra: &[&str]) -> Output {
        self.train_on("train.jsonl", out, extra)
    }

    /// The same on the training data file `data` of the setup directory.
    fn train_on(&self, data: &str, out: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "train".to_string(),
            "--model_name_or_path".into(),
            self.path("model"),
            "--train_file".into(),
            self.path(data),
            "--validation_file".into(),
            self.path("dev.jsonl"),
            "--prompt_template".into(),
            "{query} = {answer}".into(),
            "--out_dir".into(),
            self.path(out),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        qlora(&args)
    }
}

fn qlora(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .output()
        .expect("the qlora binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn log_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn loss_falls_and_the_best_adapter_is_a_peft_directory() {
    let setup = Setup::new();
    let out = setup.train(
        "run",
        &[
            "--max_steps",
            "30",
            "--lr",
            "5e-2",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
            "--target_modules",
            "all-linear",
            "--eval_steps",
            "10",
            "--batch_size",
            "4",
            "--gradient_steps",
            "2",
            "--warmup_steps",
            "2",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // 2 layers x (qkv 64->192, dense 64->64, h_to_4h 64->256, 4h_to_h 256->64) at r = 4.
    let expected_params = 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64));
    assert_eq!(expected_params, 8192);
    assert!(stdout.contains("trainable parameters: 8,192"), "{stdout}");

    let dir = setup.dir.path().join("run");
    let log = log_lines(&dir);
    assert_eq!(log.len(), 30);
    for (i, line) in log.iter().enumerate() {
        assert_eq!(line["step"], json!(i + 1));
        for key in ["epoch", "loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(line[key].is_f64(), "line {}: {key} in {line}", i + 1);
        }
        assert_eq!(line.get("val_loss").is_some(), (i + 1) % 10 == 0, "{line}");
    }
    let loss = |range: std::ops::Range<usize>| {
        log[range.clone()]
            .iter()
            .map(|l| l["loss"].as_f64().unwrap())
            .sum::<f64>()
            / range.len() as f64
    };
    // The random tiny BLOOM's tied embeddings (std 0.02, norm ~0.16, after a unit LayerNorm of
    // norm 8) bound its logits to about +-1.3, so even a perfect fit stays far above 0: from
    // ln(512) = 6.24 the loss can only fall a nat or two.
    let (start, end) = (loss(0..3), loss(27..30));
    assert!(end < start - 0.4, "loss {start} -> {end}");
    let val: Vec<f64> = log.iter().filter_map(|l| l["val_loss"].as_f64()).collect();
    assert!(val[2] < val[0], "validation loss {val:?}");

    let best = LoraAdapter::load(&dir.join("best_model")).unwrap();
    assert_eq!((best.config.lora.r, best.config.lora.alpha), (4, 8.0));
    assert_eq!(best.config.lora.target_modules, TargetModules::AllLinear);
    assert_eq!(best.num_parameters(), expected_params);
    let qkv = &best.modules["transformer.h.1.self_attention.query_key_value"];
    assert_eq!((qkv.r, qkv.in_features, qkv.out_features), (4, 64, 192));
    assert!(
        qkv.b.iter().any(|&x| x != 0.0),
        "B was trained away from zero"
    );
    LoraAdapter::load(&dir.join("final")).unwrap();
}

#[test]
fn the_same_seed_gives_the_same_adapter_bytes() {
    let setup = Setup::new();
    let run = |out: &str, seed: &str| {
        let o = setup.train(out, &["--max_steps", "4", "--lr", "1e-2", "--seed", seed]);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(
            setup
                .dir
                .path()
                .join(out)
                .join("final/adapter_model.safetensors"),
        )
        .unwrap()
    };
    let (a, b, c) = (run("a", "7"), run("b", "7"), run("c", "8"));
    assert!(a == b, "same seed, different adapters");
    assert!(a != c, "a different seed gave the same adapter");
    // Default targets of BLOOM: query_key_value only, r = 16.
    let adapter = LoraAdapter::load(&setup.dir.path().join("a/best_model")).unwrap();
    assert_eq!(adapter.modules.len(), 2);
    assert_eq!(adapter.config.lora.r, 16);
}

#[test]
fn bad_flags_and_data_fail_with_a_message() {
    let setup = Setup::new();
    let failure = |o: Output, needle: &str| {
        assert!(!o.status.success(), "should fail: {needle}");
        let err = stderr(&o);
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    };
    failure(setup.train("x", &["--lora_r", "four"]), "--lora_r");
    // Where no CUDA device opens, asking for one is an error that points to the CPU.
    if qlora_trainer::cuda::Gpu::open(0).is_err() {
        failure(setup.train("x", &["--device", "cuda"]), "--device cpu");
    }
    failure(
        qlora(&[
            "train".into(),
            "--model_name_or_path".into(),
            setup.path("model"),
        ]),
        "--train_file",
    );
    std::fs::write(
        setup.dir.path().join("bad.jsonl"),
        "{\"content\": \"color red\", \"summary\": \"a red hat\"}\n{\"content\": oops}\n",
    )
    .unwrap();
    failure(setup.train_on("bad.jsonl", "x", &[]), "bad.jsonl:2");
    failure(
        setup.train("x", &["--max_steps", "3", "--lr", "1e30"]),
        "at step",
    );
    // `x` now holds the failed run's log.
    failure(setup.train("x", &["--max_steps", "1"]), "not empty");
}
