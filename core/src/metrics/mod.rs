//! The ADGEN evaluation metrics, bit-compatible with ChatGLM's `ptuning/main.py`
//! `compute_metrics`: for each (prediction, label) pair,
//! - ROUGE-1/2/L F1 of `rouge_chinese.Rouge().get_scores(' '.join(jieba.cut(pred)),
//!   ' '.join(jieba.cut(label)))`; a side without words scores 0 (rouge_chinese would raise);
//! - BLEU-4 of NLTK `sentence_bleu([list(label)], list(pred),
//!   smoothing_function=SmoothingFunction().method3)`, over characters;
//!
//! each `round(score * 100, 4)`, then the mean over the pairs.

mod bleu;
mod pyfloat;
mod rouge;
mod segment;

use serde::{Deserialize, Serialize};

pub use segment::Segmenter;

/// One pair's scores, each x100 and rounded to 4 places as Python's `round` does. The serde
/// names are the keys of the evaluation's score dict.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairScores {
    #[serde(rename = "rouge-1")]
    pub rouge_1: f64,
    #[serde(rename = "rouge-2")]
    pub rouge_2: f64,
    #[serde(rename = "rouge-l")]
    pub rouge_l: f64,
    #[serde(rename = "bleu-4")]
    pub bleu_4: f64,
}

/// The mean of each score over `n` pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanScores {
    #[serde(flatten)]
    pub scores: PairScores,
    pub n: usize,
}

/// Scores pairs; holds the jieba segmenter, whose dictionary is slow to load: build one and
/// reuse it.
#[derive(Default)]
pub struct AdgenScorer {
    segmenter: Segmenter,
}

impl AdgenScorer {
    pub fn new() -> Self {
        AdgenScorer {
            segmenter: Segmenter::new(),
        }
    }

    /// The segmenter the ROUGE scores use (Python `jieba.cut`).
    pub fn segmenter(&self) -> &Segmenter {
        &self.segmenter
    }

    pub fn score_pair(&self, pred: &str, label: &str) -> PairScores {
        let hypothesis = self.segmenter.cut(pred).join(" ");
        let reference = self.segmenter.cut(label).join(" ");
        let rouge = rouge::rouge_f(&hypothesis, &reference).unwrap_or(rouge::RougeF {
            rouge_1: 0.0,
            rouge_2: 0.0,
            rouge_l: 0.0,
        });
        let pred_chars: Vec<char> = pred.chars().collect();
        let label_chars: Vec<char> = label.chars().collect();
        let bleu = bleu::sentence_bleu4(&label_chars, &pred_chars);
        PairScores {
            rouge_1: percent(rouge.rouge_1),
            rouge_2: percent(rouge.rouge_2),
            rouge_l: percent(rouge.rouge_l),
            bleu_4: percent(bleu),
        }
    }
}

/// `round(v * 100, 4)`.
fn percent(v: f64) -> f64 {
    pyfloat::py_round(v * 100.0, 4)
}

/// The mean of each score, as Python's `sum(scores) / len(scores)` gives it; `None` for no pairs.
pub fn mean(scores: &[PairScores]) -> Option<MeanScores> {
    if scores.is_empty() {
        return None;
    }
    let n = scores.len();
    let mean_of =
        |score: fn(&PairScores) -> f64| pyfloat::py_sum(scores.iter().map(score)) / n as f64;
    Some(MeanScores {
        scores: PairScores {
            rouge_1: mean_of(|s| s.rouge_1),
            rouge_2: mean_of(|s| s.rouge_2),
            rouge_l: mean_of(|s| s.rouge_l),
            bleu_4: mean_of(|s| s.bleu_4),
        },
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_sides_score_zero_rouge() {
        let scorer = AdgenScorer::new();
        let s = scorer.score_pair("", "一款百搭的白色衬衫");
        assert_eq!(
            (s.rouge_1, s.rouge_2, s.rouge_l, s.bleu_4),
            (0.0, 0.0, 0.0, 0.0)
        );
        let s = scorer.score_pair("简约", " ");
        assert_eq!((s.rouge_1, s.rouge_l, s.bleu_4), (0.0, 0.0, 0.0));
    }

    #[test]
    fn mean_of_nothing_is_none() {
        assert!(mean(&[]).is_none());
    }

    #[test]
    fn mean_serializes_with_the_evaluation_keys() {
        let s = PairScores {
            rouge_1: 1.0,
            rouge_2: 2.0,
            rouge_l: 3.0,
            bleu_4: 4.0,
        };
        let m = mean(&[s, s]).unwrap();
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"rouge-1":1.0,"rouge-2":2.0,"rouge-l":3.0,"bleu-4":4.0,"n":2}"#
        );
    }
}
