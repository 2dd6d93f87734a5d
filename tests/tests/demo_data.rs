//! The committed demo data (`data/demo/`, written by `scripts/make_demo_data.py`) that `qlora
//! train` fine-tunes on by default: its size, its shape (ADGEN attribute sets in, short copy
//! out), dev combinations unseen in train, and, with the demo model's tokenizer, examples short
//! enough for a few minutes of CPU training.

use qlora_core::data::{
    parse_jsonl, tokenize_records, Columns, ExampleOptions, Record, IGNORE_INDEX,
};
use qlora_core::gguf::Gguf;
use qlora_core::prompt::PromptTemplate;
use qlora_core::tokenizer::Tokenizer;
use std::collections::HashSet;
use std::path::PathBuf;

const TRAIN_PAIRS: usize = 300;
const DEV_PAIRS: usize = 40;
/// The longest training example (prompt, answer and EOS, in tokens) the demo may have.
const MAX_EXAMPLE_TOKENS: usize = 128;

fn load(name: &str) -> Vec<Record> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data/demo")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_jsonl(&path.display().to_string(), &bytes, &Columns::default()).unwrap()
}

/// The `key#value` pairs of an ADGEN `content`, e.g. `类型#裤*颜色#白色`.
fn attributes(record: &Record) -> Vec<(&str, &str)> {
    record
        .query
        .split('*')
        .map(|pair| {
            pair.split_once('#')
                .unwrap_or_else(|| panic!("line {}: `{pair}` is not key#value", record.line))
        })
        .collect()
}

#[test]
fn pairs_are_short_adgen_attribute_sets_and_copy() {
    let train = load("train.jsonl");
    let dev = load("dev.jsonl");
    assert_eq!((train.len(), dev.len()), (TRAIN_PAIRS, DEV_PAIRS));
    for record in train.iter().chain(&dev) {
        let pairs = attributes(record);
        assert!((2..=3).contains(&pairs.len()), "line {}", record.line);
        assert_eq!(
            pairs[0].0, "类型",
            "line {}: the garment type comes first",
            record.line
        );
        // Every value is named in the copy, so the mapping can be learned.
        for (_, value) in &pairs {
            assert!(
                record.response.contains(value),
                "line {}: {value}",
                record.line
            );
        }
        let chars = record.response.chars().count();
        assert!(
            (12..=25).contains(&chars),
            "line {}: {chars} characters",
            record.line
        );
        assert!(record.history.is_empty());
    }
}

#[test]
fn dev_combinations_are_new_but_their_values_are_known() {
    let train = load("train.jsonl");
    let dev = load("dev.jsonl");
    let train_contents: HashSet<&str> = train.iter().map(|r| r.query.as_str()).collect();
    assert_eq!(
        train_contents.len(),
        train.len(),
        "train repeats a combination"
    );
    let train_pairs: HashSet<(&str, &str)> = train.iter().flat_map(attributes).collect();
    for record in &dev {
        assert!(
            !train_contents.contains(record.query.as_str()),
            "dev line {} is in train: {}",
            record.line,
            record.query
        );
        for pair in attributes(record) {
            assert!(
                train_pairs.contains(&pair),
                "dev line {}: {pair:?} unseen",
                record.line
            );
        }
    }
}

/// `p`-th percentile (nearest rank) of sorted values.
fn percentile(sorted: &[usize], p: usize) -> usize {
    sorted[(sorted.len() * p).div_ceil(100).saturating_sub(1)]
}

#[test]
fn examples_fit_the_demo_model_budget() {
    let Some(path) = qlora_tests::demo_gguf() else {
        return;
    };
    let tokenizer = Tokenizer::from_gguf(&Gguf::open(path).unwrap()).unwrap();
    let template = PromptTemplate::from_tokenizer(&tokenizer).unwrap();
    // Limits far above any example, so the lengths below are untruncated.
    let options = ExampleOptions {
        max_source_length: 4 * MAX_EXAMPLE_TOKENS,
        max_target_length: 4 * MAX_EXAMPLE_TOKENS,
        system: None,
    };
    for name in ["train.jsonl", "dev.jsonl"] {
        let records = load(name);
        let examples = tokenize_records(name, &records, &template, &tokenizer, &options).unwrap();
        assert_eq!((examples.truncated, examples.skipped_empty), (0, 0));
        let mut prompt = Vec::new();
        let mut answer = Vec::new();
        let mut total = Vec::new();
        for example in &examples.examples {
            let masked = example
                .labels
                .iter()
                .filter(|&&l| l == IGNORE_INDEX)
                .count();
            prompt.push(masked);
            answer.push(example.input_ids.len() - masked);
            total.push(example.input_ids.len());
        }
        for (what, lengths) in [
            ("prompt", &mut prompt),
            ("answer", &mut answer),
            ("total", &mut total),
        ] {
            lengths.sort_unstable();
            println!(
                "{name} {what} tokens: min {} p50 {} p90 {} max {} mean {:.1}",
                lengths[0],
                percentile(lengths, 50),
                percentile(lengths, 90),
                lengths[lengths.len() - 1],
                lengths.iter().sum::<usize>() as f64 / lengths.len() as f64
            );
        }
        // Reported before the check, so a failure shows how far over the data is.
        let (longest, example) = records
            .iter()
            .zip(&examples.examples)
            .max_by_key(|(_, e)| e.input_ids.len())
            .unwrap();
        assert!(
            example.input_ids.len() < MAX_EXAMPLE_TOKENS,
            "{name} line {}: {} tokens",
            longest.line,
            example.input_ids.len()
        );
    }
}
