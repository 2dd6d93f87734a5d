//! The checkpoint readers against torch's own files: every tensor of the .bin and sharded
//! fixtures equals the golden tiny BLOOM (f32 exactly; bf16/f16 as the f32 values rounded to
//! nearest-even), views.bin equals views.json, and the writer reproduces transformers' files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use half::{bf16, f16};
use qlora_core::checkpoint::{
    open_checkpoint, SafetensorsFile, SafetensorsWriter, TensorSource, TorchFile,
};
use qlora_core::fsutil::AtomicDir;
use qlora_core::DType;
use qlora_tests::fixtures;

fn torch_fixture(name: &str) -> PathBuf {
    fixtures().join("torch").join(name)
}

fn golden_dir() -> PathBuf {
    fixtures().join("golden/tiny-bloom")
}

/// The golden f32 tensors by name.
fn golden() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let src = open_checkpoint(&golden_dir()).unwrap();
    src.tensor_infos()
        .into_iter()
        .map(|info| {
            let t = src.read(&info.name).unwrap();
            assert_eq!(t.dtype, DType::F32);
            (info.name, (t.shape.clone(), t.to_f32().unwrap()))
        })
        .collect()
}

/// Checks every tensor of `src` against the golden values rounded by `round` (bit-exact), and
/// that it holds exactly the golden tensors (BLOOM's `lm_head.weight` is tied to the embedding and
/// absent from both).
fn check_against_golden(src: &dyn TensorSource, dtype: DType, round: impl Fn(f32) -> f32) {
    let golden = golden();
    let infos = src.tensor_infos();
    let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    let golden_names: Vec<&str> = golden.keys().map(String::as_str).collect();
    assert_eq!(names, golden_names);
    for info in &infos {
        let t = src.read(&info.name).unwrap();
        let (shape, values) = &golden[&info.name];
        assert_eq!(t.dtype, dtype, "{}", info.name);
        assert_eq!(info.dtype, dtype, "{}", info.name);
        assert_eq!(&t.shape, shape, "{}", info.name);
        assert_eq!(&info.shape, shape, "{}", info.name);
        let got = t.to_f32().unwrap();
        assert_eq!(got.len(), values.len(), "{}", info.name);
        for (i, (g, w)) in got.iter().zip(values).enumerate() {
            assert_eq!(g.to_bits(), round(*w).to_bits(), "{}[{i}]", info.name);
        }
    }
}

#[test]
fn golden_has_tensors() {
    let golden = golden();
    // Embedding + its layernorm (2) + final layernorm (2), and 12 tensors in each of 2 layers.
    assert_eq!(golden.len(), 5 + 2 * 12);
    assert!(golden.contains_key("transformer.word_embeddings.weight"));
}

#[test]
fn bin_f32_equals_golden() {
    let src = open_checkpoint(&torch_fixture("bin-f32")).unwrap();
    check_against_golden(&*src, DType::F32, |x| x);
    let file = src.file_of("transformer.word_embeddings.weight").unwrap();
    assert!(file.ends_with("pytorch_model.bin"), "{file}");
}

#[test]
fn bin_sharded_bf16_equals_golden_rounded() {
    let src = open_checkpoint(&torch_fixture("bin-sharded-bf16")).unwrap();
    check_against_golden(&*src, DType::BF16, |x| bf16::from_f32(x).to_f32());
    let files: std::collections::BTreeSet<String> = src
        .tensor_infos()
        .iter()
        .map(|i| src.file_of(&i.name).unwrap())
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
}

#[test]
fn safetensors_sharded_f16_equals_golden_rounded() {
    let src = open_checkpoint(&torch_fixture("st-sharded-f16")).unwrap();
    check_against_golden(&*src, DType::F16, |x| f16::from_f32(x).to_f32());
}

#[test]
fn single_files_and_bytes_read_the_same() {
    let path = golden_dir().join("model.safetensors");
    let from_file = open_checkpoint(&path).unwrap();
    let from_bytes =
        SafetensorsFile::from_bytes("model.safetensors", std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        from_bytes.metadata().get("format").map(String::as_str),
        Some("pt")
    );
    assert_eq!(from_file.tensor_infos(), from_bytes.tensor_infos());
    for info in from_file.tensor_infos() {
        assert_eq!(
            from_file.read(&info.name).unwrap(),
            from_bytes.read(&info.name).unwrap()
        );
    }

    let bin = torch_fixture("bin-f32/pytorch_model.bin");
    let mapped = open_checkpoint(&bin).unwrap();
    let owned = TorchFile::from_bytes("pytorch_model.bin", std::fs::read(&bin).unwrap()).unwrap();
    for info in mapped.tensor_infos() {
        assert_eq!(
            mapped.read(&info.name).unwrap(),
            owned.read(&info.name).unwrap()
        );
    }
}

#[test]
fn views_bin_equals_views_json() {
    let path = torch_fixture("views.bin");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(torch_fixture("views.json")).unwrap()).unwrap();
    let src = TorchFile::open(&path).unwrap();
    let expected = json.as_object().unwrap();
    let names: Vec<String> = src.tensor_infos().into_iter().map(|i| i.name).collect();
    let mut expected_names: Vec<String> = expected.keys().cloned().collect();
    expected_names.sort();
    assert_eq!(names, expected_names);

    for (name, want) in expected {
        let t = src.read(name).unwrap();
        assert_eq!(
            t.dtype.torch_name(),
            want["dtype"].as_str().unwrap(),
            "{name}"
        );
        let shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{name}");
        let values = want["values"].as_array().unwrap();
        if t.dtype == DType::I64 {
            let got: Vec<i64> = t
                .data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let want: Vec<i64> = values.iter().map(|v| v.as_i64().unwrap()).collect();
            assert_eq!(got, want, "{name}");
        } else {
            let got = t.to_f32().unwrap();
            let want: Vec<f32> = values.iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(got, want, "{name}");
        }
    }

    // What the pickle says of the views: shared storage, offsets, strides.
    let info = |n: &str| src.torch_info(n).unwrap().clone();
    assert_eq!(info("row_slice").storage_key, info("base").storage_key);
    assert_eq!(info("row_slice").storage_offset, 16);
    assert_eq!(info("transposed").stride, [1, 8]);
    assert_eq!(
        (info("column").storage_offset, info("column").stride.clone()),
        (3, vec![8])
    );
    assert!(info("scalar").shape.is_empty());
}

/// Writing the golden tensors back gives transformers' own file, byte for byte; so does
/// rewriting each f16 shard, written in a plan order other than the file's.
#[test]
fn writer_reproduces_transformers_files() {
    let out_root = tempfile::tempdir().unwrap();
    let out = AtomicDir::create(&out_root.path().join("model"), false).unwrap();
    let mut sources = vec![(
        golden_dir().join("model.safetensors"),
        "model.safetensors".to_string(),
    )];
    for i in 1..=3 {
        let name = format!("model-0000{i}-of-00003.safetensors");
        sources.push((torch_fixture("st-sharded-f16").join(&name), name));
    }
    for (path, name) in &sources {
        let src = SafetensorsFile::open(path).unwrap();
        let mut plan = src.tensor_infos();
        plan.reverse();
        let mut w = SafetensorsWriter::create(&out.join(name), &plan).unwrap();
        for info in &plan {
            w.write_tensor(&info.name, &src.read(&info.name).unwrap().data)
                .unwrap();
        }
        w.commit().unwrap();
    }
    let dir = out.commit().unwrap();
    for (path, name) in &sources {
        let ours = std::fs::read(dir.join(name)).unwrap();
        let theirs = std::fs::read(path).unwrap();
        assert!(
            ours == theirs,
            "{name}: {} bytes vs {}",
            ours.len(),
            theirs.len()
        );
    }
}

/// Every safetensors file among the golden fixtures (f32 models, bitsandbytes 4-bit checkpoints,
/// PEFT adapters, reference tensors) opens, and each tensor reads with the size its header says.
#[test]
fn every_golden_safetensors_file_reads() {
    fn walk(dir: &std::path::Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "safetensors") {
                found.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&fixtures().join("golden"), &mut files);
    assert!(files.len() >= 8, "{files:?}");
    for path in files {
        let src = open_checkpoint(&path).unwrap();
        for info in src.tensor_infos() {
            let t = src.read(&info.name).unwrap();
            assert_eq!(
                t.data.len(),
                info.numel() * info.dtype.size_in_bytes(),
                "{}: {}",
                path.display(),
                info.name
            );
        }
    }
}
