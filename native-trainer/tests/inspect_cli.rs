//! `qlora inspect` end to end on the golden tiny models: it runs, writes stats.json and the SVG
//! plots, the numbers in stats.json are those `qlora_core::inspect` gives for the same tensors,
//! and bad input fails with a clear message.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qlora_core::checkpoint::{open_checkpoint, TensorSource};
use qlora_core::inspect::{self, InspectReport};
use qlora_core::quant::FloatData;

fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden")
        .join(rel)
}

fn qlora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .arg("inspect")
        .args(args)
        .output()
        .expect("the qlora binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Both sides through the same JSON text → value path, so floats compare exactly.
fn json(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::from_str(&serde_json::to_string(value).unwrap()).unwrap()
}

fn stats(out: &Path) -> (serde_json::Value, InspectReport) {
    let text = std::fs::read_to_string(out.join("stats.json")).unwrap();
    (
        serde_json::from_str(&text).unwrap(),
        serde_json::from_str(&text).unwrap(),
    )
}

fn read(model: &Path, name: &str) -> (FloatData<'static>, Vec<usize>) {
    let t = open_checkpoint(model).unwrap().read(name).unwrap();
    let data = match FloatData::from_le_bytes(t.dtype, &t.data).unwrap() {
        FloatData::F32(v) => FloatData::F32(v.into_owned().into()),
        other => panic!("golden tiny models are f32, not {other:?}"),
    };
    (data, t.shape)
}

fn assert_svg(path: &Path, needles: &[&str]) {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{}",
        path.display()
    );
    for n in needles {
        assert!(svg.contains(n), "{}: no `{n}`", path.display());
    }
}

#[test]
fn tiny_bloom_model_summary_matches_core() {
    let model = golden("tiny-bloom");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("inspect");
    let o = qlora(&[
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "inspect failed: {}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(
        stdout.contains("transformer.h.1.mlp.dense_4h_to_h.weight")
            && stdout.contains("nf4 bs64 dq")
    );

    let (value, report) = stats(&out);
    let InspectReport::Model(report) = report else {
        panic!("a model report")
    };
    assert_eq!(value["kind"], "model");
    assert_eq!(
        report.configs,
        inspect::quant_configs(&inspect::DEFAULT_BLOCKSIZES)
    );
    // Two layers × (query_key_value, dense, dense_h_to_4h, dense_4h_to_h).
    assert_eq!(report.tensors.len(), 8);
    // The whole document is what the core gives for the same tensors: summaries, totals, maps.
    let core_tensors: Vec<_> = report
        .tensors
        .iter()
        .map(|t| {
            let (data, shape) = read(&model, &t.name);
            inspect::summarize_tensor(&t.name, data.as_slice(), &shape, &report.configs).unwrap()
        })
        .collect();
    let core = inspect::ModelReport::new(report.configs.clone(), core_tensors);
    assert!(
        value == json(&InspectReport::Model(core)),
        "stats.json differs from the core's report"
    );
    let map = &report.heat_maps[0];
    assert_eq!(map.layers, vec![0, 1]);
    assert_eq!(
        map.modules,
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    );
    for tag in ["bs64", "bs64_dq", "bs128", "bs128_dq", "bs256", "bs256_dq"] {
        assert_svg(
            &out.join(format!("sqnr_{tag}.svg")),
            &[
                "SQNR (dB) by layer and module",
                "NF4",
                "FP4",
                "layer 1",
                "query_key_value",
                " dB",
            ],
        );
    }
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        7,
        "stats.json and six heat maps"
    );
}

#[test]
fn tiny_llama_one_tensor_matches_core() {
    let model = golden("llama/tiny-llama");
    let name = "model.layers.0.mlp.down_proj.weight";
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("down");
    let o = qlora(&[
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--tensor",
        name,
        "--blocksizes",
        "64,128",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "inspect failed: {}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout)
            .lines()
            .filter(|l| l.starts_with(name))
            .count(),
        8
    );

    let (value, report) = stats(&out);
    let InspectReport::Tensor(report) = report else {
        panic!("a tensor report")
    };
    let (data, shape) = read(&model, name);
    let configs = inspect::quant_configs(&[64, 128]);
    let core = inspect::inspect_tensor(
        name,
        data.as_slice(),
        &shape,
        &configs,
        inspect::DEFAULT_BINS,
    )
    .unwrap();
    assert!(
        value == json(&InspectReport::Tensor(core)),
        "stats.json differs from the core's report"
    );
    assert_eq!(report.shape, vec![64, 160]);
    assert_eq!(report.configs.len(), 8);
    for tag in ["bs64", "bs64_dq", "bs128", "bs128_dq"] {
        assert_svg(
            &out.join(format!("weights_{tag}.svg")),
            &[
                "weights and 4-bit levels",
                "NF4 levels",
                "FP4 levels",
                "count",
            ],
        );
        assert_svg(
            &out.join(format!("error_{tag}.svg")),
            &["quantization error", "NF4", "FP4", "<polyline"],
        );
        assert_svg(
            &out.join(format!("block_rel_error_{tag}.svg")),
            &["per-block relative error", "NF4", "FP4"],
        );
    }
}

#[test]
fn unknown_tensor_is_a_clear_error() {
    let model = golden("tiny-bloom");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let o = qlora(&[
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--tensor",
        "transformer.h.7.self_attention.query_key_value.weight",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("no tensor `transformer.h.7.self_attention.query_key_value.weight`")
            && err.contains("tiny-bloom")
            && err.contains("transformer.h.0.self_attention.query_key_value.weight"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written on failure");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "no temporary left"
    );
}

#[test]
fn bad_blocksize_is_rejected() {
    let model = golden("tiny-bloom");
    let o = qlora(&[
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--blocksizes",
        "64,48",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("blocksize 48"),
        "{}",
        text(&o.stderr)
    );
}
