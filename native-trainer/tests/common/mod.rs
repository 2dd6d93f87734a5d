//! What the `qlora train` CLI tests and the CUDA tests share: the golden fixtures, the GPU when
//! one opens, the golden tiny BLOOM with a word-level tokenizer, data it can learn, and helpers
//! to run the binary. Each test binary uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qlora_core::checkpoint::{RawTensor, TensorInfo, TensorSource};
use serde_json::{json, Value};

const COLORS: [&str; 5] = ["red", "blue", "green", "black", "white"];
const ITEMS: [&str; 4] = ["shirt", "coat", "skirt", "hat"];
const WORDS: [&str; 7] = ["color", "item", "a", "that", "looks", "great", "="];

/// `path` under the golden fixtures; `QLORA_FIXTURES` overrides the fixtures directory (for a
/// test binary run on another machine).
pub fn golden(path: &str) -> PathBuf {
    let root = std::env::var_os("QLORA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    root.join("golden").join(path)
}

/// The first CUDA device, or `None` after printing why it does not open (the test then skips).
pub fn gpu() -> Option<qlora_trainer::cuda::Gpu> {
    match qlora_trainer::cuda::Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// The tensors of `inner` whose names start with `prefix`, without it (the golden reference
/// files store the adapter values as `lora_init.<PEFT name>`).
pub struct Prefixed<'a> {
    pub inner: &'a dyn TensorSource,
    pub prefix: &'a str,
}

impl TensorSource for Prefixed<'_> {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.inner
            .tensor_infos()
            .into_iter()
            .filter_map(|info| {
                let name = info.name.strip_prefix(self.prefix)?.to_string();
                Some(TensorInfo { name, ..info })
            })
            .collect()
    }

    fn read(&self, name: &str) -> qlora_core::Result<RawTensor> {
        self.inner.read(&format!("{}{name}", self.prefix))
    }

    fn file_of(&self, name: &str) -> Option<String> {
        self.inner.file_of(&format!("{}{name}", self.prefix))
    }
}

pub fn tiny_bloom() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden/tiny-bloom")
}

/// A copy of the tiny BLOOM with a word-level tokenizer whose special ids match its config
/// (bos 1, eos 2, pad 3), and train / validation data it can tokenize.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        for file in ["config.json", "generation_config.json", "model.safetensors"] {
            std::fs::copy(tiny_bloom().join(file), model.join(file)).unwrap();
        }
        let specials = ["<unk>", "<s>", "</s>", "<pad>"];
        let tokens = specials.iter().chain(&COLORS).chain(&ITEMS).chain(&WORDS);
        qlora_tests::write_word_level_tokenizer(
            &model,
            tokens.map(|w| w.to_string()),
            specials.len(),
        );
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

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// `qlora train` on this setup into `out`, with `extra` flags.
    pub fn train(&self, out: &str, extra: &[&str]) -> Output {
        self.train_on("train.jsonl", out, extra)
    }

    /// The same on the training data file `data` of the setup directory.
    pub fn train_on(&self, data: &str, out: &str, extra: &[&str]) -> Output {
        self.command(data, out, extra)
            .output()
            .expect("the qlora binary runs")
    }

    /// The `qlora train` command of [`Setup::train_on`], to spawn.
    pub fn command(&self, data: &str, out: &str, extra: &[&str]) -> Command {
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
        let mut command = Command::new(env!("CARGO_BIN_EXE_qlora"));
        command.args(args);
        command
    }
}

pub fn qlora(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .output()
        .expect("the qlora binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn log_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
