//! `qlora predict` and `qlora eval` as a user runs them, on the tiny Qwen2 of the golden fixtures
//! given a small word-level tokenizer (the fixtures have none) and a format template whose end
//! marker is `.`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use qlora_core::prompt::Conversation;
use qlora_trainer::generate::model::{load_for_generation, GenerationDevice};
use qlora_trainer::generate::text::{prompt_ids, response_text, Stops};
use qlora_trainer::generate::{generate, GenerateOptions, Sampler, SamplingParams};

const TEMPLATE: &str = "{history}Q {query} A {answer} .";
const WORDS: [&str; 8] = ["Q", "A", ".", "hello", "world", "red", "dress", "short"];

/// A copy of the tiny Qwen2 (vocabulary 384) with a word-level tokenizer: `<unk>`, `</s>` (EOS),
/// the template's words, then `w10`..`w383`.
fn tiny_model_dir() -> tempfile::TempDir {
    let source = qlora_tests::fixtures().join("golden/llama/tiny-qwen2");
    let dir = qlora_tests::tiny_model_with_words(&source, &WORDS, 384);
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"eos_token": "</s>", "unk_token": "<unk>"}"#,
    )
    .unwrap();
    dir
}

fn qlora(args: &[&str], model: &Path, stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .arg("--model_name_or_path")
        .arg(model)
        .args(["--prompt_template", TEMPLATE, "--max_new_tokens", "6"])
        // The expected answers come from the CPU path.
        .args(["--device", "cpu"])
        // The random model repeats one word without a penalty.
        .args(["--repetition_penalty", "1.5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qlora runs");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "qlora {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The greedy response to `conversation`, from the library.
fn expected_response(model: &Path, conversation: &Conversation) -> String {
    let loaded =
        load_for_generation(model, None, None, Some(TEMPLATE), GenerationDevice::Cpu).unwrap();
    let stops = Stops::new(&loaded.tokenizer, &loaded.template).unwrap();
    let prompt = prompt_ids(&loaded.tokenizer, &loaded.template, conversation).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 6,
        stop_ids: stops.ids.clone(),
    };
    let params = SamplingParams {
        repetition_penalty: 1.5,
        ..SamplingParams::GREEDY
    };
    let mut sampler = Sampler::new(params, 0).unwrap();
    let generated = generate(&*loaded.model, &prompt, &options, &mut sampler, |ids| {
        let text = loaded.tokenizer.decode(ids, false).unwrap();
        stops.cut(&text).1
    })
    .unwrap();
    response_text(&loaded.tokenizer, &stops, &generated).unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn stops_come_from_the_tokenizer_and_the_template() {
    let model = tiny_model_dir();
    let loaded = load_for_generation(
        model.path(),
        None,
        None,
        Some(TEMPLATE),
        GenerationDevice::Cpu,
    )
    .unwrap();
    let stops = Stops::new(&loaded.tokenizer, &loaded.template).unwrap();
    // EOS `</s>` (1) and the end marker `.` (4), a single token here.
    assert_eq!(stops.ids, vec![1, 4]);
    assert_eq!(stops.marker.as_deref(), Some("."));
    assert_eq!(stops.cut("red dress . w10"), ("red dress ", true));
}

#[test]
fn predict_prompt_prints_the_greedy_response() {
    let model = tiny_model_dir();
    let args = [
        "predict",
        "--prompt",
        "hello red dress",
        "--do_sample",
        "false",
    ];
    let output = qlora(&args, model.path(), None);
    let expected = expected_response(model.path(), &Conversation::new("hello red dress"));
    assert_eq!(stdout(&output).trim(), expected);
    assert_eq!(stdout(&qlora(&args, model.path(), None)), stdout(&output));
}

#[test]
fn predict_file_adds_a_response_to_each_object() {
    let model = tiny_model_dir();
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in.jsonl");
    let output = work.path().join("out.jsonl");
    std::fs::write(
        &input,
        "{\"content\": \"hello world\", \"id\": 1}\n\n{\"content\": \"short red dress\", \"id\": 2}\n",
    )
    .unwrap();
    let args = [
        "predict",
        "--do_sample",
        "false",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    qlora(&args, model.path(), None);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, query) in lines.iter().zip(["hello world", "short red dress"]) {
        assert_eq!(line["content"], query);
        let expected = expected_response(model.path(), &Conversation::new(query));
        assert_eq!(line["response"], expected.as_str());
    }
    assert_eq!(lines[1]["id"], 2);
}

#[test]
fn interactive_chat_keeps_history_until_reset() {
    let model = tiny_model_dir();
    let output = qlora(
        &["predict", "--do_sample", "false"],
        model.path(),
        Some("hello world\nred dress\n/reset\nhello world\n"),
    );
    let text = stdout(&output);
    let responses: Vec<&str> = text.lines().collect();
    assert_eq!(responses.len(), 3, "{text:?}");
    let first = expected_response(model.path(), &Conversation::new("hello world"));
    let second = expected_response(
        model.path(),
        &Conversation {
            history: vec![("hello world".into(), first.clone())],
            ..Conversation::new("red dress")
        },
    );
    assert_eq!(responses[0].trim(), first);
    assert_eq!(responses[1].trim(), second);
    // After /reset the first question gets the first answer again.
    assert_eq!(responses[2].trim(), first);
}

#[test]
fn eval_scores_match_qlora_score_on_its_predictions() {
    let model = tiny_model_dir();
    let work = tempfile::tempdir().unwrap();
    let validation = work.path().join("dev.jsonl");
    std::fs::write(
        &validation,
        "{\"content\": \"hello world\", \"summary\": \"red dress\"}\n\
         {\"content\": \"short red dress\", \"summary\": \"w10 w11 red\"}\n\
         {\"content\": \"red\", \"summary\": \"hello\"}\n",
    )
    .unwrap();
    let predictions: PathBuf = work.path().join("preds.jsonl");
    let args = [
        "eval",
        "--validation_file",
        validation.to_str().unwrap(),
        "--batch_size",
        "2",
        "--output",
        predictions.to_str().unwrap(),
    ];
    let scores: serde_json::Value =
        serde_json::from_str(&stdout(&qlora(&args, model.path(), None))).unwrap();
    assert_eq!(scores["n"], 3);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&predictions)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (line, query) in lines.iter().zip(["hello world", "short red dress", "red"]) {
        let expected = expected_response(model.path(), &Conversation::new(query));
        assert_eq!(line["pred"], expected.as_str(), "{query}: batched vs alone");
    }
    let score = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["score", "--predictions", predictions.to_str().unwrap()])
        .output()
        .unwrap();
    let rescored: serde_json::Value = serde_json::from_slice(&score.stdout).unwrap();
    assert_eq!(rescored, scores);
}
