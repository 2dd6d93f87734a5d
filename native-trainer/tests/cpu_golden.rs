//! The CPU path against transformers + PEFT (tests/fixtures/golden, made by
//! shared/anchors/golden.py and golden_llama.py): fp32 logits and loss of the tiny BLOOM, LLaMA and
//! Qwen2 models, and the loss and LoRA gradients with known adapter values.
//!
//! Relative error = max|ours - reference| / max|reference|; run with `--nocapture` to see them.

use candle_core::{DType, Device, Tensor};
use qlora_core::arch::{
    ArchConfig, Architecture, LoraConfig, ModelConfig, PeftNaming, TargetModules,
};
use qlora_core::checkpoint::{RawTensor, SafetensorsFile, TensorInfo, TensorSource};
use qlora_trainer::cpu::{backward, causal_lm_loss, LoraInit, LoraSetup, Mode, Model};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

mod common;
use common::Prefixed;

const LOGITS_TOLERANCE: f32 = 1e-5;
const GRADIENT_TOLERANCE: f32 = 1e-4;

fn golden(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden")
        .join(path)
}

/// Opens a golden safetensors file with the real reader.
fn open_golden(path: &str) -> SafetensorsFile {
    let path = golden(path);
    SafetensorsFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Golden tensors as candle tensors.
trait GoldenTensors {
    fn f32(&self, name: &str) -> Tensor;
    fn i64(&self, name: &str) -> Tensor;
}

impl GoldenTensors for SafetensorsFile {
    fn f32(&self, name: &str) -> Tensor {
        let raw = self.read(name).unwrap();
        Tensor::from_vec(raw.to_f32().unwrap(), raw.shape, &Device::Cpu).unwrap()
    }

    fn i64(&self, name: &str) -> Tensor {
        let raw = self.read(name).unwrap();
        assert_eq!(raw.dtype, qlora_core::DType::I64);
        let values: Vec<i64> = raw
            .data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Tensor::from_vec(values, raw.shape, &Device::Cpu).unwrap()
    }
}

fn relative_error(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims());
    let ours = ours.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let reference = reference.flatten_all().unwrap();
    let diff: f32 = (&ours - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f32 = reference
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    diff / scale
}

fn scalar(t: &Tensor) -> Tensor {
    t.flatten_all().unwrap()
}

/// One golden case: a model directory and its reference file.
struct Case {
    model_dir: &'static str,
    reference: &'static str,
    /// Whether the reference ran with an `attention_mask`.
    masked: bool,
    lora_targets: &'static [&'static str],
}

const BLOOM: Case = Case {
    model_dir: "tiny-bloom",
    reference: "tiny_bloom_reference.safetensors",
    masked: false,
    lora_targets: &["query_key_value"],
};
const LLAMA_TARGETS: &[&str] = Architecture::Llama.default_lora_targets();
const LLAMA: Case = Case {
    model_dir: "llama/tiny-llama",
    reference: "llama/tiny-llama_reference.safetensors",
    masked: true,
    lora_targets: LLAMA_TARGETS,
};
const QWEN2: Case = Case {
    model_dir: "llama/tiny-qwen2",
    reference: "llama/tiny-qwen2_reference.safetensors",
    masked: true,
    lora_targets: LLAMA_TARGETS,
};

impl Case {
    fn config(&self) -> ModelConfig {
        ModelConfig::load(&golden(&format!("{}/config.json", self.model_dir))).unwrap()
    }

    fn weights(&self) -> SafetensorsFile {
        open_golden(&format!("{}/model.safetensors", self.model_dir))
    }

    /// The golden LoRA: r = 4, alpha = 8, dropout 0.
    fn lora_config(&self) -> LoraConfig {
        LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::Names(
                self.lora_targets.iter().map(|s| s.to_string()).collect(),
            ),
        }
    }

    fn inputs(&self, reference: &SafetensorsFile) -> (Tensor, Option<Tensor>, Tensor) {
        let mask = self.masked.then(|| reference.i64("attention_mask"));
        (reference.i64("input_ids"), mask, reference.i64("labels"))
    }

    /// Base model, eval mode: logits and loss against transformers.
    fn check_logits_and_loss(&self) {
        let reference = open_golden(self.reference);
        let model = Model::load(&self.config(), &self.weights(), None).unwrap();
        let (ids, mask, labels) = self.inputs(&reference);
        let logits = model.forward(&ids, mask.as_ref(), &mut Mode::Eval).unwrap();
        let loss = causal_lm_loss(&logits, &labels).unwrap();
        let logits_error = relative_error(&logits, &reference.f32("logits"));
        let loss_error = relative_error(&scalar(&loss), &reference.f32("loss"));
        println!(
            "{}: logits rel. error {logits_error:.3e}, loss rel. error {loss_error:.3e}",
            self.model_dir
        );
        assert!(logits_error <= LOGITS_TOLERANCE, "logits {logits_error}");
        assert!(loss_error <= LOGITS_TOLERANCE, "loss {loss_error}");
    }

    /// LoRA with the reference's adapter values: loss and every A/B gradient against PEFT.
    fn check_lora_loss_and_gradients(&self) {
        let reference = open_golden(self.reference);
        let init_values = Prefixed {
            inner: &reference,
            prefix: "lora_init.",
        };
        let naming = PeftNaming::Live("default".into());
        let setup = LoraSetup {
            config: self.lora_config(),
            init: LoraInit::FromSource {
                source: &init_values,
                naming: naming.clone(),
            },
        };
        let model = Model::load(&self.config(), &self.weights(), Some(&setup)).unwrap();
        let (ids, mask, labels) = self.inputs(&reference);
        let logits = model.forward(&ids, mask.as_ref(), &mut Mode::Eval).unwrap();
        let loss = causal_lm_loss(&logits, &labels).unwrap();
        let loss_error = relative_error(&scalar(&loss), &reference.f32("lora_loss"));
        println!("{}: LoRA loss rel. error {loss_error:.3e}", self.model_dir);
        assert!(loss_error <= LOGITS_TOLERANCE, "lora loss {loss_error}");

        let grads = backward(&loss).unwrap();
        let gradients = model.lora_gradients(&grads).unwrap();
        let expected = reference
            .tensor_infos()
            .iter()
            .filter(|t| t.name.starts_with("lora_grad."))
            .count();
        assert_eq!(2 * gradients.len(), expected, "one A and one B per adapter");
        let mut worst = 0f32;
        for g in &gradients {
            for (matrix, ours) in [
                (qlora_core::arch::LoraMatrix::A, &g.a),
                (qlora_core::arch::LoraMatrix::B, &g.b),
            ] {
                let name = qlora_core::arch::peft_tensor_name(g.module, matrix, &naming);
                let error = relative_error(ours, &reference.f32(&format!("lora_grad.{name}")));
                println!("  {name}: {error:.3e}");
                assert!(error <= GRADIENT_TOLERANCE, "{name}: {error}");
                worst = worst.max(error);
            }
        }
        println!(
            "{}: worst LoRA gradient rel. error {worst:.3e}",
            self.model_dir
        );
    }
}

#[test]
fn bloom_logits_and_loss_match_transformers() {
    BLOOM.check_logits_and_loss();
}

#[test]
fn bloom_lora_loss_and_gradients_match_peft() {
    BLOOM.check_lora_loss_and_gradients();
}

#[test]
fn llama_logits_and_loss_match_transformers() {
    LLAMA.check_logits_and_loss();
}

#[test]
fn llama_lora_loss_and_gradients_match_peft() {
    LLAMA.check_lora_loss_and_gradients();
}

#[test]
fn qwen2_logits_and_loss_match_transformers() {
    QWEN2.check_logits_and_loss();
}

#[test]
fn qwen2_lora_loss_and_gradients_match_peft() {
    QWEN2.check_lora_loss_and_gradients();
}

/// The adapter PEFT saved (`tiny-bloom-lora/`) under its saved names holds the reference's
/// `lora_init` values: a model built from it gives the reference LoRA loss.
#[test]
fn saved_peft_adapter_loads_under_its_names() {
    let reference = open_golden(BLOOM.reference);
    let adapter = open_golden("tiny-bloom-lora/adapter_model.safetensors");
    let setup = LoraSetup {
        config: BLOOM.lora_config(),
        init: LoraInit::FromSource {
            source: &adapter,
            naming: PeftNaming::Saved,
        },
    };
    let model = Model::load(&BLOOM.config(), &BLOOM.weights(), Some(&setup)).unwrap();
    let (ids, _, labels) = BLOOM.inputs(&reference);
    let logits = model.forward(&ids, None, &mut Mode::Eval).unwrap();
    let loss = causal_lm_loss(&logits, &labels).unwrap();
    let error = relative_error(&scalar(&loss), &reference.f32("lora_loss"));
    assert!(error <= LOGITS_TOLERANCE, "{error}");
}

/// PEFT's initialization has B = 0: the adapted model starts as the base model.
#[test]
fn random_lora_init_leaves_the_model_unchanged() {
    let reference = open_golden(QWEN2.reference);
    let setup = LoraSetup {
        config: QWEN2.lora_config(),
        init: LoraInit::Random { seed: 1 },
    };
    let model = Model::load(&QWEN2.config(), &QWEN2.weights(), Some(&setup)).unwrap();
    assert_eq!(model.lora_adapters().len(), 14);
    // A of q_proj [4, 64]: uniform in [-1/sqrt(64), 1/sqrt(64)].
    let a = model.lora_adapters()[0].a.as_tensor().abs().unwrap();
    let max_a: f32 = a
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let bound = 1.0 / 64f32.sqrt();
    assert!(max_a > 0.0 && max_a <= bound, "{max_a}");
    let (ids, mask, _) = QWEN2.inputs(&reference);
    let logits = model.forward(&ids, mask.as_ref(), &mut Mode::Eval).unwrap();
    assert!(relative_error(&logits, &reference.f32("logits")) <= LOGITS_TOLERANCE);
}

/// LoRA dropout acts in training mode only, reproducibly from the seed.
#[test]
fn lora_dropout_only_in_training_and_seeded() {
    let reference = open_golden(BLOOM.reference);
    let init_values = Prefixed {
        inner: &reference,
        prefix: "lora_init.",
    };
    let mut config = BLOOM.lora_config();
    config.dropout = 0.5;
    let setup = LoraSetup {
        config,
        init: LoraInit::FromSource {
            source: &init_values,
            naming: PeftNaming::Live("default".into()),
        },
    };
    let model = Model::load(&BLOOM.config(), &BLOOM.weights(), Some(&setup)).unwrap();
    let (ids, _, labels) = BLOOM.inputs(&reference);
    let loss = |mode: &mut Mode<'_>| -> f32 {
        let logits = model.forward(&ids, None, mode).unwrap();
        causal_lm_loss(&logits, &labels)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let eval = loss(&mut Mode::Eval);
    assert!((eval / reference.f32("lora_loss").to_vec1::<f32>().unwrap()[0] - 1.0).abs() < 1e-5);
    let train_a = loss(&mut Mode::Train(&mut StdRng::seed_from_u64(3)));
    let train_b = loss(&mut Mode::Train(&mut StdRng::seed_from_u64(3)));
    let train_c = loss(&mut Mode::Train(&mut StdRng::seed_from_u64(4)));
    assert_eq!(train_a, train_b);
    assert_ne!(train_a, eval);
    assert_ne!(train_a, train_c);
}

/// llama.cpp's converter permutes the rows of q_proj / k_proj so that RoPE rotates adjacent
/// channel pairs; with those weights and `RopeLayout::AdjacentPairs` the logits are unchanged.
#[test]
fn adjacent_pair_rope_runs_gguf_permuted_weights() {
    struct GgufPermuted<'a> {
        inner: &'a SafetensorsFile,
        head_dim: usize,
    }
    impl TensorSource for GgufPermuted<'_> {
        fn tensor_infos(&self) -> Vec<TensorInfo> {
            self.inner.tensor_infos()
        }
        fn read(&self, name: &str) -> qlora_core::Result<RawTensor> {
            let mut raw = self.inner.read(name)?;
            if name.contains("q_proj") || name.contains("k_proj") {
                // Row (head, 2j + s) of the GGUF tensor is row (head, s * d/2 + j) of the HF one.
                let row_bytes = raw.data.len() / raw.shape[0];
                let d = self.head_dim;
                let mut permuted = Vec::with_capacity(raw.data.len());
                for new_row in 0..raw.shape[0] {
                    let (head, within) = (new_row / d, new_row % d);
                    let (j, s) = (within / 2, within % 2);
                    let old_row = head * d + s * d / 2 + j;
                    permuted.extend_from_slice(&raw.data[old_row * row_bytes..][..row_bytes]);
                }
                raw.data = permuted;
            }
            Ok(raw)
        }
        fn file_of(&self, name: &str) -> Option<String> {
            self.inner.file_of(name)
        }
    }
    let reference = open_golden(QWEN2.reference);
    let mut config = QWEN2.config();
    let ArchConfig::Llama(llama) = &mut config.arch else {
        panic!("qwen2 is a llama-family model")
    };
    llama.rope_layout = qlora_core::arch::RopeLayout::AdjacentPairs;
    let weights = QWEN2.weights();
    let permuted = GgufPermuted {
        inner: &weights,
        head_dim: llama.head_dim,
    };
    let model = Model::load(&config, &permuted, None).unwrap();
    let (ids, mask, _) = QWEN2.inputs(&reference);
    let logits = model.forward(&ids, mask.as_ref(), &mut Mode::Eval).unwrap();
    let error = relative_error(&logits, &reference.f32("logits"));
    println!("adjacent-pair RoPE on permuted qwen2 weights: logits rel. error {error:.3e}");
    assert!(error <= LOGITS_TOLERANCE, "{error}");
}

#[test]
fn wrong_tensor_shape_names_file_and_tensor() {
    let mut config = BLOOM.config();
    let ArchConfig::Bloom(bloom) = &mut config.arch else {
        panic!()
    };
    bloom.vocab_size = 500;
    let err = Model::load(&config, &BLOOM.weights(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("transformer.word_embeddings.weight")
            && err.contains("expected [500, 64]"),
        "{err}"
    );
}

/// BLOOM with padding, as transformers applies it: ALiBi positions count only real tokens and
/// padding keys are masked, so a left- or right-padded row gives the unpadded row's logits at its
/// real tokens.
#[test]
fn bloom_padding_leaves_real_tokens_unchanged() {
    let model = Model::load(&BLOOM.config(), &BLOOM.weights(), None).unwrap();
    let dev = &Device::Cpu;
    let real = [1u32, 17, 99, 250, 44];
    let unpadded = Tensor::new(&[real], dev).unwrap();
    let expected = model
        .forward(&unpadded, None, &mut Mode::Eval)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let pad = 3u32;
    let ids = Tensor::new(
        &[
            [pad, pad, real[0], real[1], real[2], real[3], real[4]],
            [real[0], real[1], real[2], real[3], real[4], pad, pad],
        ],
        dev,
    )
    .unwrap();
    let mask = Tensor::new(&[[0u8, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], dev).unwrap();
    let logits = model.forward(&ids, Some(&mask), &mut Mode::Eval).unwrap();
    for (row, start) in [(0, 2), (1, 0)] {
        let got = logits
            .get(row)
            .unwrap()
            .narrow(0, start, real.len())
            .unwrap();
        let error = relative_error(&got, &expected);
        assert!(error <= LOGITS_TOLERANCE, "row {row}: {error}");
    }
}

/// A checkpoint saved from the bare base model has no `transformer.` prefix; it loads the same.
#[test]
fn checkpoint_without_base_model_prefix_loads() {
    let reference = open_golden(BLOOM.reference);
    let weights = BLOOM.weights();
    // Reading `name` from this view reads `transformer.<name>`: a checkpoint whose names lack
    // the prefix.
    let bare = Prefixed {
        inner: &weights,
        prefix: "transformer.",
    };
    let model = Model::load(&BLOOM.config(), &bare, None).unwrap();
    let (ids, _, _) = BLOOM.inputs(&reference);
    let logits = model.forward(&ids, None, &mut Mode::Eval).unwrap();
    assert!(relative_error(&logits, &reference.f32("logits")) <= LOGITS_TOLERANCE);
}
