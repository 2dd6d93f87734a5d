//! `qlora quantize` end to end: the 4-bit checkpoints it writes hold, tensor for tensor, the
//! bytes transformers + bitsandbytes wrote for the same golden models; bad input fails cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qlora_core::checkpoint::bnb4bit::Dequantizing;
use qlora_core::checkpoint::{open_checkpoint, TensorSource};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn golden(rel: &str) -> PathBuf {
    fixtures().join("golden").join(rel)
}

fn qlora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .output()
        .expect("the qlora binary runs")
}

fn quantize(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "quantize",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--compute_dtype",
        "float32",
    ];
    args.extend_from_slice(extra);
    qlora(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every tensor of `ours` equals the one of the same name in `theirs`, byte for byte, and both
/// hold the same names.
fn assert_same_tensors(ours: &Path, theirs: &Path) {
    let a = open_checkpoint(ours).unwrap();
    let b = open_checkpoint(theirs).unwrap();
    let names = |s: &dyn TensorSource| {
        s.tensor_infos()
            .into_iter()
            .map(|i| i.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(a.as_ref()), names(b.as_ref()), "tensor names differ");
    for name in names(a.as_ref()) {
        let (x, y) = (a.read(&name).unwrap(), b.read(&name).unwrap());
        assert_eq!(x.dtype, y.dtype, "{name}: dtype");
        assert_eq!(x.shape, y.shape, "{name}: shape");
        assert!(x.data == y.data, "{name}: bytes differ");
    }
}

fn quantization_config(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["quantization_config"].clone()
}

fn check_against_golden(model: &str, golden_4bit: &str, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let o = quantize(&golden(model), &out, extra);
    assert!(o.status.success(), "quantize failed: {}", stderr(&o));
    assert_same_tensors(&out, &golden(golden_4bit));
    assert_eq!(
        quantization_config(&out),
        quantization_config(&golden(golden_4bit))
    );
    assert!(
        out.join("generation_config.json").is_file(),
        "companion files are copied"
    );
}

#[test]
fn tiny_bloom_nf4_matches_transformers() {
    check_against_golden(
        "tiny-bloom",
        "tiny-bloom-nf4",
        &["--quan", "nf4", "--double_quant"],
    );
}

#[test]
fn tiny_bloom_fp4_matches_transformers() {
    check_against_golden(
        "tiny-bloom",
        "tiny-bloom-fp4",
        &["--quan", "fp4", "--double_quant"],
    );
}

#[test]
fn tiny_llama_nf4_matches_transformers() {
    check_against_golden(
        "llama/tiny-llama",
        "llama/tiny-llama-nf4",
        &["--quan", "nf4", "--double_quant"],
    );
}

#[test]
fn tiny_llama_fp4_matches_transformers() {
    check_against_golden(
        "llama/tiny-llama",
        "llama/tiny-llama-fp4",
        &["--quan", "fp4"],
    );
}

#[test]
fn tiny_qwen2_nf4_matches_transformers() {
    check_against_golden(
        "llama/tiny-qwen2",
        "llama/tiny-qwen2-nf4",
        &["--quan", "nf4", "--double_quant"],
    );
}

#[test]
fn tiny_qwen2_fp4_matches_transformers() {
    check_against_golden(
        "llama/tiny-qwen2",
        "llama/tiny-qwen2-fp4",
        &["--quan", "fp4"],
    );
}

#[test]
fn pytorch_bin_input_gives_the_same_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let o = quantize(
        &fixtures().join("torch/bin-f32"),
        &out,
        &["--quan", "nf4", "--double_quant"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_tensors(&out, &golden("tiny-bloom-nf4"));
}

#[test]
fn sharded_bf16_input_quantizes_from_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let o = quantize(
        &fixtures().join("torch/bin-sharded-bf16"),
        &out,
        &["--double_quant"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let q = Dequantizing::new(open_checkpoint(&out).unwrap());
    let w = "transformer.h.1.self_attention.query_key_value.weight";
    let state = q.quantized(w).expect("a quantized weight").unwrap();
    assert_eq!(state.dtype, qlora_core::DType::BF16);
    let info = q.tensor_infos().into_iter().find(|i| i.name == w).unwrap();
    assert_eq!(info.shape, vec![192, 64]);
    // The dequantized weight is within one NF4 step of the bf16 original.
    let original = open_checkpoint(&fixtures().join("torch/bin-sharded-bf16"))
        .unwrap()
        .read(w)
        .unwrap()
        .to_f32()
        .unwrap();
    let back = q.read(w).unwrap().to_f32().unwrap();
    let max = original.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = original
        .iter()
        .zip(&back)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err > 0.0 && err < 0.2 * max,
        "max error {err} vs max |w| {max}"
    );
}

/// A failing run exits non-zero, says `needle`, and leaves nothing at the output path nor a
/// temporary directory beside it.
fn assert_fails_cleanly(model: &Path, needle: &str, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let o = quantize(model, &out, extra);
    assert!(!o.status.success(), "expected a failure");
    let err = stderr(&o);
    assert!(
        err.contains(needle),
        "error should mention {needle:?}: {err}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "output left behind: {left:?}");
}

/// A copy of a golden model directory to damage.
fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn truncated_safetensors_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    copy_model(&golden("tiny-bloom"), &model);
    let f = model.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1000]).unwrap();
    assert_fails_cleanly(&model, "model.safetensors", &[]);
}

#[test]
fn shapes_that_disagree_with_config_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    copy_model(&golden("tiny-bloom"), &model);
    let cfg = model.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"vocab_size\": 512", "\"vocab_size\": 500"),
    )
    .unwrap();
    assert_fails_cleanly(&model, "transformer.word_embeddings.weight", &[]);
}

#[test]
fn missing_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    copy_model(&fixtures().join("torch/st-sharded-f16"), &model);
    std::fs::remove_file(model.join("model-00002-of-00003.safetensors")).unwrap();
    assert_fails_cleanly(&model, "model-00002-of-00003.safetensors", &[]);
}

#[test]
fn a_quantized_input_is_refused() {
    assert_fails_cleanly(
        &golden("tiny-bloom-nf4"),
        "already a quantized checkpoint",
        &[],
    );
}

#[test]
fn unknown_quant_type_is_refused() {
    assert_fails_cleanly(&golden("tiny-bloom"), "int3", &["--quan", "int3"]);
}

#[test]
fn bad_blocksize_is_refused() {
    assert_fails_cleanly(&golden("tiny-bloom"), "blocksize", &["--blocksize", "48"]);
}

#[test]
fn integer_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    copy_model(&golden("tiny-bloom"), &model);
    // Rewrite the checkpoint with one weight stored as int64.
    let src = open_checkpoint(&golden("tiny-bloom")).unwrap();
    let mut infos = src.tensor_infos();
    let target = "transformer.h.0.mlp.dense_h_to_4h.weight";
    for i in &mut infos {
        if i.name == target {
            i.dtype = qlora_core::DType::I64;
        }
    }
    let path = model.join("model.safetensors");
    let mut w = qlora_core::checkpoint::SafetensorsWriter::create(&path, &infos).unwrap();
    for i in &infos {
        let t = src.read(&i.name).unwrap();
        let data = if i.name == target {
            t.data.iter().flat_map(|_| [0u8; 2]).collect()
        } else {
            t.data
        };
        w.write_tensor(&i.name, &data).unwrap();
    }
    w.commit().unwrap();
    assert_fails_cleanly(&model, target, &[]);
}

#[test]
fn a_non_empty_output_is_kept_unless_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = quantize(&golden("tiny-bloom"), &out, &[]);
    assert!(!o.status.success());
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    let o = quantize(&golden("tiny-bloom"), &out, &["--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").is_file());
}
