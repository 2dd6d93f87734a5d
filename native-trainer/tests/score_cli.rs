//! `qlora score` as a user runs it: the built binary on JSON-lines files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn golden() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden/adgen_metrics_golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden JSON parses")
}

fn score(predictions: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .arg("score")
        .arg("--predictions")
        .arg(predictions)
        .output()
        .expect("qlora runs")
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn prints_the_golden_means() {
    let golden = golden();
    let lines: Vec<String> = golden["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| serde_json::json!({"pred": p["pred"], "label": p["label"]}).to_string())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    // A blank line in the middle is skipped, as the golden script skips it.
    let text = format!("{}\n\n{}\n", lines[..10].join("\n"), lines[10..].join("\n"));
    let out = score(&write(&dir, "predictions.jsonl", &text));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let stdout = String::from_utf8(out.stdout).unwrap();
    let printed: Value = serde_json::from_str(stdout.trim()).expect("one JSON object on stdout");
    let mut expected = golden["mean"].clone();
    expected["n"] = 24.into();
    assert_eq!(printed, expected);
}

#[test]
fn accepts_chatglm_prediction_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "generated_predictions.txt",
        "{\"labels\": \"蕾丝\", \"predict\": \"蕾丝\"}\n",
    );
    let out = score(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The golden scores of the pair ("蕾丝", "蕾丝").
    let expected = serde_json::json!({
        "rouge-1": 100.0, "rouge-2": 0.0, "rouge-l": 100.0, "bleu-4": 59.4604, "n": 1
    });
    assert_eq!(printed, expected);
}

#[test]
fn bad_lines_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"pred": "简约", "label": "简约大方"}"#;
    for (name, bad, line) in [
        ("not_json.jsonl", "{\"pred\": \"x\",", 3),
        ("no_label.jsonl", r#"{"pred": "x"}"#, 3),
        ("number.jsonl", r#"{"pred": 1, "label": "x"}"#, 3),
    ] {
        let path = write(&dir, name, &format!("{good}\n\n{bad}\n{good}\n"));
        let out = score(&path);
        assert!(
            !out.status.success(),
            "{name}: exit status {:?}",
            out.status
        );
        assert!(out.stdout.is_empty(), "{name}: nothing on stdout");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let location = format!("{}:{line}:", path.display());
        assert!(
            stderr.contains(&location),
            "{name}: stderr {stderr:?} lacks {location}"
        );
    }
}

#[test]
fn empty_or_missing_files_fail() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(&dir, "empty.jsonl", "\n  \n");
    let out = score(&empty);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no prediction pairs"));

    let missing = dir.path().join("missing.jsonl");
    let out = score(&missing);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&missing.display().to_string()));
}
