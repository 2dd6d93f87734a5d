//! `qlora train` end to end on the golden tiny BLOOM (given a small word-level tokenizer): the
//! loss falls, the adapters are PEFT directories, the log parses, runs are reproducible, and bad
//! input fails with a message.

use std::process::Output;

use qlora_core::arch::TargetModules;
use qlora_core::peft::LoraAdapter;
use serde_json::json;

mod common;
use common::{log_lines, qlora, stderr, Setup};

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
        // Step 1 sends the weights to ~1e31 (no warmup); step 2's forward overflows.
        "the training loss is NaN at step 2 (epoch 1; its batch: training examples ",
    );
    // `x` now holds the failed run's log.
    failure(setup.train("x", &["--max_steps", "1"]), "not empty");
}

#[test]
fn a_diverging_run_stops_naming_step_and_batch_and_keeps_the_earlier_adapters() {
    let setup = Setup::new();
    // Step 1 has rate 0 (warmup); the update of step 2 at 1e30 sends the weights to ~1e31.
    let out = setup.train(
        "run",
        &[
            "--max_steps",
            "4",
            "--lr",
            "1e30",
            "--warmup_steps",
            "1",
            "--lora_r",
            "4",
            "--eval_steps",
            "1",
            "--save_steps",
            "1",
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    for needle in [
        "the validation loss after the update is NaN at step 2 (epoch 1; its batch: training \
         examples ",
        "lines ",
        "try a lower --lr",
        "the last checkpoint is checkpoint-1/",
    ] {
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    }
    let dir = setup.dir.path().join("run");
    assert!(!dir.join("final").exists() && !dir.join("checkpoint-2").exists());
    let best = std::fs::read(dir.join("best_model/adapter_model.safetensors")).unwrap();
    let kept = std::fs::read(dir.join("checkpoint-1/adapter_model.safetensors")).unwrap();
    assert!(best == kept, "best_model/ is not step 1's adapter");
    let adapter = LoraAdapter::load(&dir.join("best_model")).unwrap();
    assert!(adapter
        .modules
        .values()
        .all(|p| p.a.iter().chain(&p.b).all(|x| x.is_finite())));
    assert_eq!(log_lines(&dir).len(), 1);
}

#[test]
fn bad_data_fails_naming_file_and_line_and_writes_nothing() {
    let setup = Setup::new();
    let good = r#"{"content": "color red item hat", "summary": "a red hat"}"#;
    let cases: [(&[u8], &str); 5] = [
        (b"{\"content\": oops}\n", "bad.jsonl:2: malformed JSON"),
        (
            b"{\"content\": \"color red\"}\n",
            "bad.jsonl:2: missing column `summary` (the line has columns `content`)",
        ),
        (
            b"{\"content\": \"red\xff\"}\n",
            "bad.jsonl:2: not valid UTF-8 at byte 16 of the line",
        ),
        (
            b"{\"content\": \"red\", \"summary\": 3}\n",
            "column `summary` should be a string",
        ),
        (b"", "the file is empty"),
    ];
    for (second_line, needle) in cases {
        let text = if second_line.is_empty() {
            Vec::new()
        } else {
            [good.as_bytes(), b"\n", second_line].concat()
        };
        std::fs::write(setup.dir.path().join("bad.jsonl"), text).unwrap();
        let out = setup.train_on("bad.jsonl", "out", &["--max_steps", "1"]);
        assert!(!out.status.success(), "should fail: {needle}");
        let err = stderr(&out);
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        if needle.starts_with("bad.jsonl:2") {
            assert!(err.contains("--skip_bad_lines skips such lines"), "{err}");
        }
        assert!(
            !setup.dir.path().join("out").exists(),
            "a failed run left an output directory"
        );
    }
}

#[test]
fn bad_lines_are_skipped_on_request_and_truncation_is_counted() {
    let setup = Setup::new();
    let train = std::fs::read_to_string(setup.dir.path().join("train.jsonl")).unwrap();
    let mut lines: Vec<&str> = train.lines().collect();
    lines.insert(1, "{\"content\": oops}");
    lines.insert(4, "[1, 2]");
    lines.insert(8, "{\"summary\": \"a red hat\"}");
    std::fs::write(setup.dir.path().join("messy.jsonl"), lines.join("\n")).unwrap();
    let out = setup.train_on(
        "messy.jsonl",
        "run",
        &[
            "--skip_bad_lines",
            "--max_steps",
            "1",
            "--max_source_length",
            "3",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    for needle in [
        "messy.jsonl: skipped 3 bad lines (lines 2, 5, 9); the first: ",
        "messy.jsonl:2: malformed JSON",
        // Every prompt `color <c> item <i> =` is 5 words; every answer fits.
        "messy.jsonl: 20 of 20 examples truncated (20 with the prompt over max_source_length = 3 \
         tokens, 0 with the answer",
    ] {
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    }
}

#[test]
fn resuming_checks_the_run_and_a_finished_run_resumes_to_the_same_adapter() {
    let setup = Setup::new();
    let flags = ["--max_steps", "2", "--lr", "1e-2", "--save_steps", "1"];
    let first = setup.train("run", &flags);
    assert!(first.status.success(), "{}", stderr(&first));
    let dir = setup.dir.path().join("run");
    let adapter = || std::fs::read(dir.join("final/adapter_model.safetensors")).unwrap();
    let before = adapter();

    let resume = |extra: &[&str]| {
        let mut all = flags.to_vec();
        all.extend_from_slice(extra);
        all.push("--resume_from_checkpoint");
        setup.train("run", &all)
    };
    let again = resume(&[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        adapter() == before,
        "resuming a finished run changed its adapter"
    );
    assert_eq!(log_lines(&dir).len(), 2);

    let mismatch = resume(&["--lora_r", "8"]);
    assert!(!mismatch.status.success());
    let err = stderr(&mismatch);
    assert!(
        err.contains("checkpoint-2 was written by a different run: --lora_r is 8 now but was 16"),
        "{err}"
    );
    std::fs::write(
        setup.dir.path().join("other.jsonl"),
        r#"{"content": "color red item hat", "summary": "a red hat"}"#,
    )
    .unwrap();
    let mut other = flags.to_vec();
    other.push("--resume_from_checkpoint");
    let err = stderr(&setup.train_on("other.jsonl", "run", &other));
    assert!(
        err.contains("training data is 1 examples of 9 tokens"),
        "{err}"
    );

    let empty = setup.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = stderr(&setup.train("empty", &["--resume_from_checkpoint"]));
    assert!(
        err.contains("no complete checkpoint to resume from"),
        "{err}"
    );
}
