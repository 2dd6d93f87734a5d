//! PEFT adapters written by peft 0.21 read and written back byte for byte.

use qlora_core::peft::{LoraAdapter, CONFIG_FILE, WEIGHTS_FILE};
use qlora_tests::fixtures;

fn roundtrip(rel: &str, modules: usize, r: usize) {
    let dir = fixtures().join("golden").join(rel);
    let adapter = LoraAdapter::load(&dir).unwrap();
    assert_eq!(adapter.modules.len(), modules, "{rel}: adapted modules");
    assert!(adapter.modules.values().all(|p| p.r == r));
    let out = tempfile::tempdir().unwrap();
    adapter.save(out.path()).unwrap();
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        let ours = std::fs::read(out.path().join(file)).unwrap();
        let theirs = std::fs::read(dir.join(file)).unwrap();
        assert!(ours == theirs, "{rel}/{file} differs after a round trip");
    }
    assert_eq!(LoraAdapter::load(out.path()).unwrap(), adapter);
}

#[test]
fn tiny_bloom_lora_round_trips_exactly() {
    roundtrip("tiny-bloom-lora", 2, 4);
}

#[test]
fn tiny_llama_lora_round_trips_exactly() {
    roundtrip("llama/tiny-llama-lora", 14, 4);
}

#[test]
fn tiny_qwen2_lora_round_trips_exactly() {
    roundtrip("llama/tiny-qwen2-lora", 14, 4);
}

#[test]
fn adapter_values_are_the_golden_ones() {
    // tiny-bloom-lora holds the `lora_init` values of the reference file.
    let adapter = LoraAdapter::load(&fixtures().join("golden/tiny-bloom-lora")).unwrap();
    let reference = qlora_core::checkpoint::open_file(
        &fixtures().join("golden/tiny_bloom_reference.safetensors"),
    )
    .unwrap();
    for (path, pair) in &adapter.modules {
        for (half, values) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
            let name = format!("lora_init.base_model.model.{path}.{half}.default.weight");
            let want = reference.read(&name).unwrap().to_f32().unwrap();
            assert_eq!(&want, values, "{name}");
        }
    }
}

#[test]
fn a_missing_half_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("golden/tiny-bloom-lora");
    std::fs::copy(src.join(CONFIG_FILE), dir.path().join(CONFIG_FILE)).unwrap();
    let full = LoraAdapter::load(&src).unwrap();
    let mut broken = full.clone();
    broken.modules.clear();
    broken.save(dir.path()).unwrap();
    // Rewrite with only lora_A of the first module.
    let source = qlora_core::checkpoint::open_file(&src.join(WEIGHTS_FILE)).unwrap();
    let name = "base_model.model.transformer.h.0.self_attention.query_key_value.lora_A.weight";
    let t = source.read(name).unwrap();
    let info = qlora_core::checkpoint::TensorInfo {
        name: name.into(),
        dtype: t.dtype,
        shape: t.shape.clone(),
    };
    let mut w =
        qlora_core::checkpoint::SafetensorsWriter::create(&dir.path().join(WEIGHTS_FILE), &[info])
            .unwrap();
    w.write_tensor(name, &t.data).unwrap();
    w.commit().unwrap();
    let err = LoraAdapter::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("query_key_value.lora_B.weight") && err.contains("missing"),
        "{err}"
    );
}
