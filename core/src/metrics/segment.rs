//! Chinese word segmentation equal to Python jieba 0.42.1's default `jieba.cut(text)` (accurate
//! mode, HMM on), built on jieba-rs.
//!
//! jieba-rs runs the same algorithm (prefix DAG, max-log-frequency route, HMM Viterbi for runs of
//! unknown single characters) but differs from Python jieba in four places, each undone here:
//! - Dictionary: jieba-rs's embedded dictionary drops a duplicate line of jieba's `dict.txt`
//!   (and needs zstd, which does not build for wasm32). We load jieba 0.42.1's own `dict.txt`
//!   (`data/jieba_dict.txt`). Python's total frequency counts every line, duplicates included,
//!   while jieba-rs sums one frequency per word; the surplus goes into an entry no block can
//!   reach, so `ln(total)` and thus every route score is Python's.
//! - HMM: jieba-rs's built-in emission probabilities are rounded to 6 decimals. We load jieba's
//!   full-precision `finalseg` tables (`data/jieba_hmm.model`, made by
//!   `data/make_jieba_hmm_model.py`).
//! - Han blocks: jieba-rs also counts CJK extensions and U+9FD6..U+9FFF as Han; Python's
//!   `re_han_default` is `[\u4E00-\u9FD5a-zA-Z0-9+#&\._%\-]`. We split blocks by Python's class
//!   and hand jieba-rs only those, so its own split never differs.
//! - HMM leftovers: for the non-Han part of a run the HMM leaves, Python's `finalseg` splits by
//!   `[a-zA-Z0-9]+(?:\.\d+)?%?`, jieba-rs also joins `.`/`_`/`-` between alphanumerics (`3-5`,
//!   `v1.2.3`). Such a token is ASCII and never a dictionary word (no word of jieba's dictionary
//!   has an alphanumeric-connector-alphanumeric sequence), so we split those tokens again by
//!   Python's pattern.

use std::collections::HashMap;

use jieba_rs::{HmmModel, Jieba};

/// jieba 0.42.1's `jieba/dict.txt`: `word freq tag` per line (MIT licence, jieba's authors).
const JIEBA_DICT: &str = include_str!("data/jieba_dict.txt");
/// jieba 0.42.1's `finalseg` HMM in jieba-rs's model format, full precision.
const JIEBA_HMM: &str = include_str!("data/jieba_hmm.model");
/// Holds the part of Python jieba's total frequency that jieba-rs would not count (duplicate
/// dictionary lines). Only Han blocks are ever looked up, and a newline is never in one.
const TOTAL_SURPLUS_WORD: &str = "\n";

/// A jieba segmenter with Python jieba's dictionary and HMM. Building one parses the dictionary
/// (349k words, a fraction of a second optimized): build it once and reuse it.
pub struct Segmenter {
    jieba: Jieba,
}

impl Default for Segmenter {
    fn default() -> Self {
        Self::new()
    }
}

impl Segmenter {
    pub fn new() -> Self {
        // Both tables are compiled in and checked by this module's tests: failing to parse them
        // is a build defect, not bad input.
        let mut jieba = Jieba::with_dict(&mut JIEBA_DICT.as_bytes())
            .expect("the embedded jieba dictionary parses");
        let surplus = duplicate_line_frequency(JIEBA_DICT);
        if surplus > 0 {
            jieba.add_word(TOTAL_SURPLUS_WORD, Some(surplus), None);
        }
        let hmm = HmmModel::load(&mut JIEBA_HMM.as_bytes()).expect("the embedded HMM parses");
        jieba.set_hmm_model(hmm);
        Segmenter { jieba }
    }

    /// Python `list(jieba.cut(text))`.
    pub fn cut<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut words = Vec::new();
        for (is_han, block) in blocks(text) {
            if is_han {
                for token in self.jieba.cut(block, true) {
                    let word = token.word;
                    if word.len() > 1 && word.is_ascii() && !self.jieba.has_word(word) {
                        split_like_finalseg(word, &mut words);
                    } else {
                        words.push(word);
                    }
                }
            } else {
                split_non_han_block(block, &mut words);
            }
        }
        words
    }
}

/// The frequency that Python jieba adds to its total for lines whose word appears again later:
/// it sums every line, jieba-rs keeps one frequency (the last) per word.
fn duplicate_line_frequency(dict: &str) -> usize {
    let mut last_freq: HashMap<&str, usize> = HashMap::with_capacity(dict.len() / 14);
    let mut surplus = 0;
    for line in dict.lines() {
        let mut fields = line.split_whitespace();
        let Some(word) = fields.next() else { continue };
        let freq = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        if let Some(previous) = last_freq.insert(word, freq) {
            surplus += previous;
        }
    }
    surplus
}

/// Python jieba's `re_han_default` class: `[\u4E00-\u9FD5a-zA-Z0-9+#&\._%\-]`.
fn is_han_default(c: char) -> bool {
    matches!(
        c,
        '\u{4E00}'..='\u{9FD5}' | '+' | '#' | '&' | '.' | '_' | '%' | '-'
    ) || c.is_ascii_alphanumeric()
}

/// `re_han_default.split(text)`: maximal runs of Han-class and of other characters, in order.
fn blocks(text: &str) -> impl Iterator<Item = (bool, &str)> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let first = rest.chars().next()?;
        let is_han = is_han_default(first);
        let end = rest
            .char_indices()
            .find(|&(_, c)| is_han_default(c) != is_han)
            .map_or(rest.len(), |(i, _)| i);
        let (block, tail) = rest.split_at(end);
        rest = tail;
        Some((is_han, block))
    })
}

/// A non-Han block as Python jieba's `cut` yields it: split by `(\r\n|\s)`, keeping the
/// separators, and every other character alone; so every character alone except `\r\n`.
fn split_non_han_block<'a>(block: &'a str, words: &mut Vec<&'a str>) {
    let mut rest = block;
    while let Some(c) = rest.chars().next() {
        let len = if rest.starts_with("\r\n") {
            2
        } else {
            c.len_utf8()
        };
        words.push(&rest[..len]);
        rest = &rest[len..];
    }
}

/// `finalseg`'s split of a non-Han run: `re.split("([a-zA-Z0-9]+(?:\.\d+)?%?)", run)`, keeping
/// the non-empty pieces. `run` is ASCII.
fn split_like_finalseg<'a>(run: &'a str, words: &mut Vec<&'a str>) {
    let bytes = run.as_bytes();
    let mut gap_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphanumeric() {
            i += 1;
        }
        if i + 1 < bytes.len() && bytes[i] == b'.' && bytes[i + 1].is_ascii_digit() {
            i += 1;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
        }
        if i < bytes.len() && bytes[i] == b'%' {
            i += 1;
        }
        if gap_start < start {
            words.push(&run[gap_start..start]);
        }
        words.push(&run[start..i]);
        gap_start = i;
    }
    if gap_start < bytes.len() {
        words.push(&run[gap_start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finalseg_split(run: &str) -> Vec<&str> {
        let mut words = Vec::new();
        split_like_finalseg(run, &mut words);
        words
    }

    #[test]
    fn finalseg_split_matches_python_re_split() {
        // re.split(r"([a-zA-Z0-9]+(?:\.\d+)?%?)", s), empty pieces dropped (CPython 3.11).
        assert_eq!(finalseg_split("3-5"), ["3", "-", "5"]);
        assert_eq!(finalseg_split("v1.2.3"), ["v1.2", ".", "3"]);
        assert_eq!(finalseg_split("a.b%"), ["a", ".", "b%"]);
        assert_eq!(finalseg_split("1.5%"), ["1.5%"]);
        assert_eq!(finalseg_split("+#x_y-"), ["+#", "x", "_", "y", "-"]);
        assert_eq!(finalseg_split("5%.3"), ["5%", ".", "3"]);
    }

    #[test]
    fn matches_python_where_plain_jieba_rs_differs() {
        // list(jieba.cut(s)) with jieba 0.42.1.
        let segmenter = Segmenter::new();
        assert_eq!(
            segmenter.cut("尺码3-5天发货v1.2.3版本"),
            ["尺码", "3", "-", "5", "天", "发货", "v1.2", ".", "3", "版本"]
        );
        // U+9FD6.. and CJK extension A are outside Python's Han class.
        assert_eq!(segmenter.cut("中文鿖鿗"), ["中文", "鿖", "鿗"]);
        assert_eq!(segmenter.cut("㐀㐁丽人"), ["㐀", "㐁", "丽人"]);
    }

    #[test]
    fn non_han_blocks_keep_crlf_together() {
        let words: Vec<&str> = Segmenter::new().cut("a\r\n\r\n \u{3000}b");
        assert_eq!(words, ["a", "\r\n", "\r\n", " ", "\u{3000}", "b"]);
    }

    #[test]
    fn dictionary_total_counts_duplicate_lines() {
        assert_eq!(duplicate_line_frequency("a 3 n\nb 5 n\na 4 n\n"), 3);
        // jieba 0.42.1's dict.txt lists `B超 3 n` twice.
        assert_eq!(duplicate_line_frequency(JIEBA_DICT), 3);
    }
}
