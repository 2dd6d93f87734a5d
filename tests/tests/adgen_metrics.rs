//! The ADGEN metrics against `adgen_metrics_golden.json` (made by Python jieba, rouge_chinese and
//! NLTK): jieba segmentation word for word, every pair's four scores and their means exactly.

use qlora_core::metrics::{mean, AdgenScorer, PairScores};
use serde_json::Value;

fn golden() -> Value {
    let path = qlora_tests::fixtures().join("golden/adgen_metrics_golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden JSON parses")
}

fn pairs(golden: &Value) -> &[Value] {
    let pairs = golden["pairs"].as_array().expect("golden has pairs");
    assert_eq!(pairs.len(), 24, "the golden file holds 24 pairs");
    pairs
}

fn text<'a>(pair: &'a Value, key: &str) -> &'a str {
    pair[key]
        .as_str()
        .unwrap_or_else(|| panic!("pair has no string `{key}`"))
}

fn words(pair: &Value, key: &str) -> Vec<String> {
    serde_json::from_value(pair[key].clone()).unwrap_or_else(|e| panic!("`{key}`: {e}"))
}

#[test]
fn segmentation_equals_python_jieba() {
    let golden = golden();
    let scorer = AdgenScorer::new();
    let mut mismatches = Vec::new();
    for (i, pair) in pairs(&golden).iter().enumerate() {
        for (text_key, words_key) in [("pred", "pred_words"), ("label", "label_words")] {
            let ours = scorer.segmenter().cut(text(pair, text_key));
            let expected = words(pair, words_key);
            if ours != expected {
                mismatches.push(format!(
                    "pair {i} {text_key}: ours {ours:?}, jieba {expected:?}"
                ));
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn scores_and_mean_equal_the_evaluation() {
    let golden = golden();
    let scorer = AdgenScorer::new();
    let mut all = Vec::new();
    let mut mismatches = Vec::new();
    for (i, pair) in pairs(&golden).iter().enumerate() {
        let ours = scorer.score_pair(text(pair, "pred"), text(pair, "label"));
        let expected: PairScores = serde_json::from_value(pair["scores"].clone()).unwrap();
        if ours != expected {
            mismatches.push(format!("pair {i}: ours {ours:?}, golden {expected:?}"));
        }
        all.push(ours);
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));

    let ours = mean(&all).expect("24 pairs have a mean");
    let expected: PairScores = serde_json::from_value(golden["mean"].clone()).unwrap();
    assert_eq!(ours.n, 24);
    assert_eq!(ours.scores, expected, "mean over the pairs");
}
