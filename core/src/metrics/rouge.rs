//! ROUGE-1/2/L F1 exactly as `rouge_chinese.Rouge().get_scores(hyp, ref)` (rouge-chinese 1.0.3)
//! computes them on space-joined words: its sentence cut, its whitespace normalisation and word
//! split, distinct n-grams for ROUGE-N (`exclusive=True`), and summary-level LCS over all words
//! for ROUGE-L, each F with its `+ 1e-8` in the denominator.

use std::collections::HashSet;

use super::pyfloat::py_split_whitespace;

/// F1 scores in [0, 1], not yet scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RougeF {
    pub rouge_1: f64,
    pub rouge_2: f64,
    pub rouge_l: f64,
}

/// `Rouge().get_scores(hypothesis, reference)[0]`'s F values, or `None` where rouge_chinese
/// raises "Hypothesis is empty." / "Reference is empty." (a side with no non-space character).
pub fn rouge_f(hypothesis: &str, reference: &str) -> Option<RougeF> {
    let hyp_sentences = sentences(hypothesis);
    let ref_sentences = sentences(reference);
    if hyp_sentences.is_empty() || ref_sentences.is_empty() {
        return None;
    }
    let hyp_words = words(&hyp_sentences);
    let ref_words = words(&ref_sentences);
    Some(RougeF {
        rouge_1: rouge_n(&hyp_words, &ref_words, 1),
        rouge_2: rouge_n(&hyp_words, &ref_words, 2),
        rouge_l: rouge_l(&hyp_words, &ref_words),
    })
}

/// One `cut_sent` rule, `re.sub("(HEAD)(TAIL)", r"\1\n\2", text)`: `head` is a fixed sequence of
/// character classes, `TAIL` one character not in `tail_excluded`.
struct BreakRule {
    head: &'static [&'static [char]],
    tail_excluded: &'static [char],
}

const ENDERS: &[char] = &['。', '！', '？', '?'];
const CLOSING_QUOTES: &[char] = &['”', '’'];
const DOT: &[char] = &['.'];
const ELLIPSIS: &[char] = &['…'];

/// `Rouge.cut_sent`'s four substitutions, in its order.
const CUT_SENT_RULES: [BreakRule; 4] = [
    // ([。！？\?])([^”’])
    BreakRule {
        head: &[ENDERS],
        tail_excluded: CLOSING_QUOTES,
    },
    // (\.{6})([^”’])
    BreakRule {
        head: &[DOT, DOT, DOT, DOT, DOT, DOT],
        tail_excluded: CLOSING_QUOTES,
    },
    // (\…{2})([^”’])
    BreakRule {
        head: &[ELLIPSIS, ELLIPSIS],
        tail_excluded: CLOSING_QUOTES,
    },
    // ([。！？\?][”’])([^，。！？\?])
    BreakRule {
        head: &[ENDERS, CLOSING_QUOTES],
        tail_excluded: &['，', '。', '！', '？', '?'],
    },
];

impl BreakRule {
    /// `re.sub` scans left to right and resumes after each match; with a fixed-length pattern
    /// that is exactly this loop.
    fn apply(&self, text: &[char]) -> Vec<char> {
        let width = self.head.len();
        let mut out = Vec::with_capacity(text.len() + text.len() / 8);
        let mut i = 0;
        while i < text.len() {
            let matches = i + width < text.len()
                && self
                    .head
                    .iter()
                    .zip(&text[i..])
                    .all(|(class, c)| class.contains(c))
                && !self.tail_excluded.contains(&text[i + width]);
            if matches {
                out.extend_from_slice(&text[i..i + width]);
                out.push('\n');
                out.push(text[i + width]);
                i += width + 1;
            } else {
                out.push(text[i]);
                i += 1;
            }
        }
        out
    }
}

/// `[" ".join(s.split()) for s in self.cut_sent(text) if len(s) > 0]`.
fn sentences(text: &str) -> Vec<String> {
    let mut chars: Vec<char> = text.chars().collect();
    for rule in &CUT_SENT_RULES {
        chars = rule.apply(&chars);
    }
    let cut: String = chars.into_iter().collect();
    cut.trim_end_matches(super::pyfloat::py_isspace)
        .split('\n')
        .filter(|s| !s.is_empty())
        .map(|s| py_split_whitespace(s).collect::<Vec<_>>().join(" "))
        .collect()
}

/// `_split_into_words`: every sentence split on single spaces, flattened. A sentence that was
/// all whitespace is "" and gives one empty word, as Python's `"".split(" ")` does.
fn words(sentences: &[String]) -> Vec<&str> {
    sentences.iter().flat_map(|s| s.split(' ')).collect()
}

/// `rouge_n` with `exclusive=True`: distinct n-grams on each side and their intersection.
fn rouge_n(hyp: &[&str], reference: &[&str], n: usize) -> f64 {
    let hyp_ngrams: HashSet<&[&str]> = hyp.windows(n).collect();
    let ref_ngrams: HashSet<&[&str]> = reference.windows(n).collect();
    let overlap = hyp_ngrams.intersection(&ref_ngrams).count();
    // `f_r_p_rouge_n`: an empty side has precision (or recall) 0.
    let precision = if hyp_ngrams.is_empty() {
        0.0
    } else {
        overlap as f64 / hyp_ngrams.len() as f64
    };
    let recall = if ref_ngrams.is_empty() {
        0.0
    } else {
        overlap as f64 / ref_ngrams.len() as f64
    };
    f_score(precision, recall)
}

/// `rouge_l_summary_level`: LCS of all reference words against all hypothesis words.
fn rouge_l(hyp: &[&str], reference: &[&str]) -> f64 {
    let lcs = lcs_len(reference, hyp) as f64;
    f_score(lcs / hyp.len() as f64, lcs / reference.len() as f64)
}

/// rouge_chinese's F: `2.0 * ((p * r) / (p + r + 1e-8))`, in that evaluation order.
fn f_score(precision: f64, recall: f64) -> f64 {
    2.0 * ((precision * recall) / (precision + recall + 1e-8))
}

/// Length of the longest common subsequence (the `_lcs` table's last cell), one row at a time.
fn lcs_len(x: &[&str], y: &[&str]) -> usize {
    let mut previous = vec![0usize; y.len() + 1];
    let mut current = vec![0usize; y.len() + 1];
    for xi in x {
        for (j, yj) in y.iter().enumerate() {
            current[j + 1] = if xi == yj {
                previous[j] + 1
            } else {
                previous[j + 1].max(current[j])
            };
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[y.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_sent_matches_rouge_chinese() {
        // [" ".join(s.split()) for s in Rouge().cut_sent(t) if len(s) > 0] (rouge-chinese 1.0.3).
        assert_eq!(sentences("！ ！ ！"), ["！", "！", "！"]);
        assert_eq!(sentences("好。”对 不？”，嗯"), ["好。”", "对 不？”，嗯"]);
        assert_eq!(sentences("a......b ……c"), ["a......", "b ……", "c"]);
        assert_eq!(sentences("a\n \nb  "), ["a", "", "b"]);
        assert_eq!(sentences(" \t "), Vec::<String>::new());
    }

    #[test]
    fn empty_sentence_gives_an_empty_word() {
        assert_eq!(words(&sentences("a\n \nb")), ["a", "", "b"]);
    }

    #[test]
    fn scores_match_rouge_chinese() {
        // Rouge().get_scores(h, r)[0][m]["f"] (rouge-chinese 1.0.3), repr'd.
        let s = rouge_f("的 的 的 设计", "这 款 的 设计 的").unwrap();
        assert_eq!(s.rouge_1, 0.6666666622222223);
        assert_eq!(s.rouge_2, 0.33333332888888895);
        assert_eq!(s.rouge_l, 0.4444444395061729);
        assert!(rouge_f("  ", "a").is_none());
        assert!(rouge_f("a", "").is_none());
    }
}
