//! The CPU path on the golden 4-bit checkpoints (transformers + bitsandbytes wrote them):
//! logits within 1e-4 (relative to the largest) of the 4-bit model's logits on the GPU.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use qlora_core::arch::ModelConfig;
use qlora_core::checkpoint::bnb4bit::Dequantizing;
use qlora_core::checkpoint::{open_checkpoint, open_file, TensorSource};
use qlora_trainer::cpu::{Mode, Model};

const TOLERANCE: f32 = 1e-4;

fn golden(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden")
        .join(path)
}

fn tensor(source: &dyn TensorSource, name: &str) -> Tensor {
    let raw = source.read(name).unwrap();
    match raw.dtype {
        qlora_core::DType::I64 => {
            let v: Vec<i64> = raw
                .data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            Tensor::from_vec(v, raw.shape, &Device::Cpu).unwrap()
        }
        _ => Tensor::from_vec(raw.to_f32().unwrap(), raw.shape, &Device::Cpu).unwrap(),
    }
}

/// Relative error of the 4-bit model's logits, with `inputs` holding `input_ids` (and maybe
/// `attention_mask`).
fn check(model_dir: &str, inputs: &str) {
    let dir = golden(model_dir);
    let config = ModelConfig::load(&dir.join("config.json")).unwrap();
    assert!(config.quantization.is_some());
    let weights = Dequantizing::new(open_checkpoint(&dir).unwrap());
    let model = Model::load(&config, &weights, None).unwrap();
    let inputs = open_file(&golden(inputs)).unwrap();
    let ids = tensor(inputs.as_ref(), "input_ids");
    let mask = inputs
        .tensor_infos()
        .iter()
        .any(|i| i.name == "attention_mask")
        .then(|| tensor(inputs.as_ref(), "attention_mask"));
    let logits = model.forward(&ids, mask.as_ref(), &mut Mode::Eval).unwrap();
    let reference = open_file(&dir.join("reference_logits.safetensors")).unwrap();
    let want = tensor(reference.as_ref(), "logits");
    let max_ref = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let max_diff = (logits - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let rel = max_diff / max_ref;
    println!("{model_dir}: relative logits error {rel:.3e}");
    assert!(rel <= TOLERANCE, "{model_dir}: {rel:e} > {TOLERANCE:e}");
}

#[test]
fn tiny_bloom_nf4() {
    check("tiny-bloom-nf4", "tiny_bloom_reference.safetensors");
}

#[test]
fn tiny_bloom_fp4() {
    check("tiny-bloom-fp4", "tiny_bloom_reference.safetensors");
}

#[test]
fn tiny_llama_nf4() {
    check(
        "llama/tiny-llama-nf4",
        "llama/tiny-llama_reference.safetensors",
    );
}

#[test]
fn tiny_llama_fp4() {
    check(
        "llama/tiny-llama-fp4",
        "llama/tiny-llama_reference.safetensors",
    );
}

#[test]
fn tiny_qwen2_nf4() {
    check(
        "llama/tiny-qwen2-nf4",
        "llama/tiny-qwen2_reference.safetensors",
    );
}

#[test]
fn tiny_qwen2_fp4() {
    check(
        "llama/tiny-qwen2-fp4",
        "llama/tiny-qwen2_reference.safetensors",
    );
}
