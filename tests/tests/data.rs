//! Training data: JSON-lines errors (each names file:line), tokenization into examples with the
//! prompt masked out of the labels, truncation, and batch collation.

use qlora_core::data::{
    collate, load_examples, parse_jsonl, tokenize_records, Columns, Example, ExampleOptions,
    IGNORE_INDEX,
};
use qlora_core::prompt::PromptTemplate;
use qlora_core::tokenizer::{SpecialTokenNames, Tokenizer};

const EOS: u32 = 0;
const PAD: u32 = 1;

/// A word-level tokenizer with a known id for every word the tests use.
fn word_tokenizer() -> Tokenizer {
    word_tokenizer_with(SpecialTokenNames::default())
}

/// The same with more special-token settings (`eos`, `pad` and `unk` are always set).
fn word_tokenizer_with(names: SpecialTokenNames) -> Tokenizer {
    let words = [
        "</s>", "<pad>", "<unk>", "Q", ":", "A", "hello", "world", "bye", "one", "two", "three",
        "four", "five", ".",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(id, w)| (w.to_string(), id.into()))
        .collect();
    let added = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(EOS, "</s>"), added(PAD, "<pad>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let names = SpecialTokenNames {
        eos: Some("</s>".into()),
        pad: Some("<pad>".into()),
        unk: Some("<unk>".into()),
        ..names
    };
    Tokenizer::from_tokenizer_json("words.json", json.to_string().as_bytes(), &names).unwrap()
}

fn options(max_source_length: usize, max_target_length: usize) -> ExampleOptions {
    ExampleOptions {
        max_source_length,
        max_target_length,
        system: None,
    }
}

fn examples(jsonl: &str, template: &str, options: &ExampleOptions) -> qlora_core::data::Examples {
    let columns = Columns {
        history: Some("history".into()),
        ..Columns::default()
    };
    let records = parse_jsonl("d.jsonl", jsonl.as_bytes(), &columns).unwrap();
    let template = PromptTemplate::from_format(template).unwrap();
    tokenize_records("d.jsonl", &records, &template, &word_tokenizer(), options).unwrap()
}

const ONE: &str = r#"{"content": "hello world", "summary": "bye", "history": null}"#;

#[test]
fn labels_mask_the_prompt_and_keep_answer_and_eos() {
    let out = examples(ONE, "Q : {query} A :", &options(64, 64));
    assert_eq!((out.truncated, out.skipped_empty), (0, 0));
    let [example] = out.examples.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(example.input_ids, vec![3, 4, 6, 7, 5, 4, 8, EOS]);
    let m = IGNORE_INDEX;
    assert_eq!(example.labels, vec![m, m, m, m, m, m, 8, i64::from(EOS)]);
}

#[test]
fn template_text_after_the_answer_is_learned_and_eos_is_not_doubled() {
    let out = examples(ONE, "Q : {query} A : {answer} .", &options(64, 64));
    assert_eq!(
        out.examples[0].input_ids,
        vec![3, 4, 6, 7, 5, 4, 8, 14, EOS]
    );
    assert_eq!(&out.examples[0].labels[6..], &[8, 14, i64::from(EOS)]);
    let out = examples(ONE, "Q : {query} A : {answer} </s>", &options(64, 64));
    assert_eq!(out.examples[0].input_ids, vec![3, 4, 6, 7, 5, 4, 8, EOS]);
}

#[test]
fn bos_is_prepended_once_where_the_tokenizer_adds_it() {
    // `Q` (id 3) plays the BOS token.
    let tokenizer = word_tokenizer_with(SpecialTokenNames {
        bos: Some("Q".into()),
        add_bos: true,
        ..SpecialTokenNames::default()
    });
    let records = parse_jsonl("d.jsonl", ONE.as_bytes(), &Columns::default()).unwrap();
    let tokenize = |format: &str| {
        let template = PromptTemplate::from_format(format).unwrap();
        tokenize_records("d.jsonl", &records, &template, &tokenizer, &options(8, 8)).unwrap()
    };
    assert_eq!(
        tokenize("{query}").examples[0].input_ids,
        vec![3, 6, 7, 8, EOS]
    );
    assert_eq!(
        tokenize("Q {query}").examples[0].input_ids,
        vec![3, 6, 7, 8, EOS]
    );
    assert_eq!(
        tokenize("{query}").examples[0].labels[..3],
        [IGNORE_INDEX; 3]
    );
}

#[test]
fn history_turns_are_prompt_and_get_no_loss() {
    let line =
        r#"{"content": "hello", "summary": "bye", "history": [["one", "two"], ["three", "four"]]}"#;
    let out = examples(line, "{history}Q {query} A {answer} .", &options(64, 64));
    let example = &out.examples[0];
    // Q one A two . Q three A four . Q hello A | bye . </s>
    assert_eq!(
        example.input_ids,
        vec![3, 9, 5, 10, 14, 3, 11, 5, 12, 14, 3, 6, 5, 8, 14, EOS]
    );
    let answer_start = example
        .labels
        .iter()
        .position(|&l| l != IGNORE_INDEX)
        .unwrap();
    assert_eq!(answer_start, 13);
}

#[test]
fn truncation_cuts_source_and_target_then_appends_eos_and_is_counted() {
    let lines = [
        r#"{"content": "one two three four five", "summary": "one two three", "history": []}"#,
        ONE,
    ]
    .join("\n");
    let out = examples(&lines, "{query}", &options(3, 3));
    assert_eq!(out.truncated, 1);
    assert_eq!((out.truncated_source, out.truncated_target), (1, 1));
    assert_eq!(
        out.truncation_report(&options(3, 3)).unwrap(),
        "1 of 2 examples truncated (1 with the prompt over max_source_length = 3 tokens, \
         1 with the answer over max_target_length = 3 tokens, EOS included)"
    );
    assert_eq!((out.examples[0].line, out.examples[1].line), (1, 2));
    assert_eq!(out.examples[0].input_ids, vec![9, 10, 11, 9, 10, EOS]);
    assert_eq!(out.examples[0].labels[..3], [IGNORE_INDEX; 3]);
    assert_eq!(out.examples[1].input_ids, vec![6, 7, 8, EOS]);
}

#[test]
fn records_with_an_empty_prompt_or_response_are_skipped_and_counted() {
    let lines = [
        r#"{"content": "", "summary": "bye", "history": null}"#,
        r#"{"content": "hello", "summary": null, "history": null}"#,
        ONE,
    ]
    .join("\n");
    let out = examples(&lines, "{query}", &options(8, 8));
    assert_eq!((out.examples.len(), out.skipped_empty), (1, 2));
    let columns = Columns::default();
    let records = parse_jsonl("d.jsonl", br#"{"content": "", "summary": ""}"#, &columns).unwrap();
    let template = PromptTemplate::from_format("{query}").unwrap();
    let msg = tokenize_records(
        "d.jsonl",
        &records,
        &template,
        &word_tokenizer(),
        &options(8, 8),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("no usable examples"), "{msg}");
}

fn parse_error(bytes: &[u8], columns: &Columns) -> String {
    parse_jsonl("d.jsonl", bytes, columns)
        .unwrap_err()
        .to_string()
}

#[test]
fn malformed_json_names_file_and_line() {
    let msg = parse_error(
        b"{\"content\": \"a\", \"summary\": \"b\"}\n{\"content\": ",
        &Columns::default(),
    );
    assert!(msg.starts_with("d.jsonl:2: malformed JSON"), "{msg}");
    let msg = parse_error(b"[1, 2]", &Columns::default());
    assert!(
        msg.starts_with("d.jsonl:1: a line should be a JSON object"),
        "{msg}"
    );
}

#[test]
fn missing_column_names_file_line_and_column() {
    let msg = parse_error(b"\n{\"content\": \"a\"}", &Columns::default());
    assert!(
        msg.starts_with("d.jsonl:2: missing column `summary`"),
        "{msg}"
    );
    let columns = Columns {
        prompt: "q".into(),
        response: "a".into(),
        history: Some("turns".into()),
    };
    let msg = parse_error(br#"{"q": "x", "a": "y"}"#, &columns);
    assert!(
        msg.starts_with("d.jsonl:1: missing column `turns`"),
        "{msg}"
    );
}

#[test]
fn wrongly_typed_columns_are_errors() {
    let msg = parse_error(br#"{"content": 5, "summary": "b"}"#, &Columns::default());
    assert!(
        msg.contains("d.jsonl:1: column `content` should be a string"),
        "{msg}"
    );
    let columns = Columns {
        history: Some("history".into()),
        ..Columns::default()
    };
    let msg = parse_error(
        br#"{"content": "a", "summary": "b", "history": [["only one"]]}"#,
        &columns,
    );
    assert!(
        msg.contains("d.jsonl:1: column `history` should be a list of [query, response]"),
        "{msg}"
    );
}

#[test]
fn empty_file_is_a_clear_error() {
    for bytes in [&b""[..], b"\n\n  \n"] {
        let msg = parse_error(bytes, &Columns::default());
        assert_eq!(msg, "d.jsonl: the file is empty: no JSON lines to train on");
    }
}

#[test]
fn non_utf8_names_file_and_line() {
    let msg = parse_error(
        b"{\"content\": \"a\", \"summary\": \"b\"}\r\n\n{\"content\": \"\xff\"}",
        &Columns::default(),
    );
    assert!(msg.starts_with("d.jsonl:3: not valid UTF-8"), "{msg}");
}

#[test]
fn load_examples_reads_a_file_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.jsonl");
    std::fs::write(&path, format!("\u{feff}{ONE}\n{ONE}\n")).unwrap();
    let template = PromptTemplate::from_format("{query}").unwrap();
    let tokenizer = word_tokenizer();
    let out = load_examples(
        &path,
        &Columns::default(),
        &template,
        &tokenizer,
        &options(8, 8),
    )
    .unwrap();
    assert_eq!(out.examples.len(), 2);
    std::fs::write(&path, format!("{ONE}\nnot json\n")).unwrap();
    let msg = load_examples(
        &path,
        &Columns::default(),
        &template,
        &tokenizer,
        &options(8, 8),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.starts_with(&format!("{}:2: malformed JSON", path.display())),
        "{msg}"
    );
    let missing = dir.path().join("missing.jsonl");
    let msg = load_examples(
        &missing,
        &Columns::default(),
        &template,
        &tokenizer,
        &options(8, 8),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("missing.jsonl"), "{msg}");
}

#[test]
fn collate_right_pads_and_masks_only_the_padding() {
    let long = Example {
        input_ids: vec![3, 6, 8, EOS],
        labels: vec![IGNORE_INDEX, IGNORE_INDEX, 8, i64::from(EOS)],
        line: 1,
    };
    let short = Example {
        input_ids: vec![6, EOS],
        labels: vec![IGNORE_INDEX, i64::from(EOS)],
        line: 2,
    };
    // EOS doubles as the pad token, as in SmolLM2: the real EOS label must survive.
    let batch = collate(&[&long, &short], EOS, true);
    assert_eq!((batch.batch_size, batch.seq_len), (2, 4));
    assert_eq!(batch.input_ids, vec![3, 6, 8, EOS, 6, EOS, EOS, EOS]);
    assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 1, 1, 0, 0]);
    let m = IGNORE_INDEX;
    assert_eq!(batch.labels, vec![m, m, 8, 0, m, 0, m, m]);
    let batch = collate(&[&short, &long], PAD, false);
    assert_eq!(batch.input_ids[..4], [6, EOS, PAD, PAD]);
    assert_eq!(batch.labels[..4], [m, 0, i64::from(PAD), i64::from(PAD)]);
}

#[test]
fn adgen_data_reads_with_the_default_columns() {
    let Some(golden) = qlora_tests::shared_golden() else {
        return;
    };
    let dev = golden.join("../adgen/dev.jsonl");
    if !dev.is_file() {
        eprintln!("skipped: {} is absent", dev.display());
        return;
    }
    let bytes = std::fs::read(&dev).unwrap();
    let records = parse_jsonl("dev.jsonl", &bytes, &Columns::default()).unwrap();
    assert_eq!(records.len(), 1070);
    assert!(records
        .iter()
        .all(|r| !r.query.is_empty() && r.history.is_empty()));
}
