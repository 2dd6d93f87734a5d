//! Sentence BLEU-4 exactly as NLTK's `sentence_bleu([reference], hypothesis,
//! smoothing_function=SmoothingFunction().method3)` computes it (nltk 3.x `bleu_score.py`):
//! clipped n-gram precisions as fractions, 0 when no unigram matches, NIST geometric smoothing
//! `1 / (2^k * denominator)` for the k-th order with no match, weights 0.25, `math.fsum` of the
//! weighted logs, brevity penalty against the (only, so closest) reference length.

use std::collections::HashMap;
use std::hash::Hash;

use super::pyfloat::fsum;

const MAX_ORDER: usize = 4;
const WEIGHT: f64 = 0.25;

/// BLEU-4 in [0, 1] of `hypothesis` against one `reference`, both token sequences.
pub fn sentence_bleu4<T: Eq + Hash>(reference: &[T], hypothesis: &[T]) -> f64 {
    let precisions: Vec<(usize, usize)> = (1..=MAX_ORDER)
        .map(|n| modified_precision(reference, hypothesis, n))
        .collect();
    // NLTK returns 0 outright when no unigram matches (so also for an empty hypothesis).
    if precisions[0].0 == 0 {
        return 0.0;
    }
    let mut zero_orders_seen = 0;
    let log_terms = precisions.iter().map(|&(numerator, denominator)| {
        // A Fraction converts to the correctly rounded quotient, as f64 division of two exact
        // integers does; method3's `1 / (2**k * denominator)` likewise.
        let p = if numerator == 0 {
            zero_orders_seen += 1;
            1.0 / ((1usize << zero_orders_seen) * denominator) as f64
        } else {
            numerator as f64 / denominator as f64
        };
        WEIGHT * p.ln()
    });
    let log_mean = fsum(log_terms.collect::<Vec<_>>());
    brevity_penalty(reference.len(), hypothesis.len()) * log_mean.exp()
}

/// NLTK `modified_precision` as (numerator, denominator): hypothesis n-gram counts clipped by
/// the reference's, over the number of hypothesis n-grams (at least 1).
fn modified_precision<T: Eq + Hash>(reference: &[T], hypothesis: &[T], n: usize) -> (usize, usize) {
    let hyp_counts = ngram_counts(hypothesis, n);
    let ref_counts = ngram_counts(reference, n);
    let clipped = hyp_counts
        .iter()
        .map(|(ngram, &count)| count.min(ref_counts.get(ngram).copied().unwrap_or(0)))
        .sum();
    let total: usize = hyp_counts.values().sum();
    (clipped, total.max(1))
}

fn ngram_counts<T: Eq + Hash>(tokens: &[T], n: usize) -> HashMap<&[T], usize> {
    let mut counts = HashMap::new();
    for ngram in tokens.windows(n) {
        *counts.entry(ngram).or_insert(0) += 1;
    }
    counts
}

/// NLTK `brevity_penalty(closest_ref_len, hyp_len)`; `hyp_len > 0` here, since an empty
/// hypothesis has already scored 0.
fn brevity_penalty(ref_len: usize, hyp_len: usize) -> f64 {
    if hyp_len > ref_len {
        1.0
    } else {
        (1.0 - ref_len as f64 / hyp_len as f64).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> Vec<char> {
        s.chars().collect()
    }

    #[test]
    fn matches_nltk() {
        // repr(sentence_bleu([list(r)], list(h), smoothing_function=SmoothingFunction().method3))
        // with nltk 3.10.
        let bleu = |h: &str, r: &str| sentence_bleu4(&chars(r), &chars(h));
        assert_eq!(bleu("abcabc", "abcd"), 0.3021375397356768);
        assert_eq!(bleu("ab", "abcdefg"), 0.04880803219926451);
        assert_eq!(bleu("", "abc"), 0.0);
        assert_eq!(bleu("xyz", "abc"), 0.0);
        assert_eq!(bleu("abcd", "abcd"), 1.0);
    }

    #[test]
    fn clips_repeated_ngrams() {
        assert_eq!(modified_precision(&chars("ab"), &chars("aaaa"), 1), (1, 4));
        assert_eq!(modified_precision(&chars("ab"), &chars("aaaa"), 4), (0, 1));
        assert_eq!(modified_precision(&chars("ab"), &chars("a"), 2), (0, 1));
    }
}
