//! Training data: JSON-lines records (prompt, response, optional history columns, as the ADGEN
//! and ChatGLM p-tuning data have them), their tokenization into training examples with the
//! prompt masked out of the loss, and the collation of examples into padded batches.

use crate::prompt::{Conversation, PromptTemplate};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde_json::Value;

/// The label that the loss ignores (PyTorch's `CrossEntropyLoss` default `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Which JSON fields hold the parts of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// The user message (default `content`, as in ADGEN).
    pub prompt: String,
    /// The answer to learn (default `summary`).
    pub response: String,
    /// Earlier turns, a list of `[query, response]` pairs; `None` when the data has none.
    pub history: Option<String>,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            prompt: "content".into(),
            response: "summary".into(),
            history: None,
        }
    }
}

/// One JSON line, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based line number in the file, for messages.
    pub line: usize,
    pub query: String,
    pub response: String,
    pub history: Vec<(String, String)>,
}

fn at_line(file: &str, line: usize, msg: impl Into<String>) -> Error {
    Error::format(format!("{file}:{line}"), msg)
}

/// A string column; JSON `null` reads as empty (such a record is skipped later, as the ChatGLM
/// p-tuning code skips records with an empty prompt or response).
fn string_column(file: &str, line: usize, row: &Value, column: &str) -> Result<String> {
    match row.get(column) {
        None => Err(missing_column(file, line, row, column)),
        Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(at_line(
            file,
            line,
            format!("column `{column}` should be a string, not {other}"),
        )),
    }
}

/// Names the column that is missing and the ones the line has, so that a wrong
/// `--prompt_column` is obvious from the message.
fn missing_column(file: &str, line: usize, row: &Value, column: &str) -> Error {
    let present: Vec<String> = row
        .as_object()
        .map(|o| o.keys().map(|k| format!("`{k}`")).collect())
        .unwrap_or_default();
    let has = if present.is_empty() {
        "no columns".to_string()
    } else {
        format!("columns {}", present.join(", "))
    };
    at_line(
        file,
        line,
        format!("missing column `{column}` (the line has {has})"),
    )
}

fn history_column(
    file: &str,
    line: usize,
    row: &Value,
    column: &str,
) -> Result<Vec<(String, String)>> {
    let bad = || {
        at_line(
            file,
            line,
            format!("column `{column}` should be a list of [query, response] string pairs"),
        )
    };
    match row.get(column) {
        None => Err(missing_column(file, line, row, column)),
        Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(turns)) => turns
            .iter()
            .map(|turn| match turn.as_array().map(Vec::as_slice) {
                Some([Value::String(q), Value::String(r)]) => Ok((q.clone(), r.clone())),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// One line of the file as a record; `None` for a blank line. `offset` is the line's first byte
/// in the file.
fn parse_line(
    file: &str,
    line: usize,
    offset: usize,
    raw: &[u8],
    columns: &Columns,
) -> Result<Option<Record>> {
    let text = std::str::from_utf8(raw).map_err(|e| {
        let at = e.valid_up_to();
        at_line(
            file,
            line,
            format!(
                "not valid UTF-8 at byte {at} of the line (byte {} of the file): {e}",
                offset + at
            ),
        )
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let row: Value = serde_json::from_str(text)
        .map_err(|e| at_line(file, line, format!("malformed JSON: {e}")))?;
    if !row.is_object() {
        return Err(at_line(file, line, "a line should be a JSON object"));
    }
    let history = match &columns.history {
        Some(column) => history_column(file, line, &row, column)?,
        None => Vec::new(),
    };
    Ok(Some(Record {
        line,
        query: string_column(file, line, &row, &columns.prompt)?,
        response: string_column(file, line, &row, &columns.response)?,
        history,
    }))
}

/// A line that [`parse_jsonl_skipping_bad_lines`] left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it (the message [`parse_jsonl`] would fail with).
    pub error: String,
}

/// The records of a file read with [`parse_jsonl_skipping_bad_lines`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRecords {
    pub records: Vec<Record>,
    /// The lines skipped, in file order.
    pub bad_lines: Vec<BadLine>,
}

/// Reads JSON-lines data held in memory (`file` names it in messages). Blank lines are skipped;
/// every error names `file:line` (a non-UTF-8 line also the byte offset).
pub fn parse_jsonl(file: &str, bytes: &[u8], columns: &Columns) -> Result<Vec<Record>> {
    parse_lines(file, bytes, columns, false).map(|parsed| parsed.records)
}

/// As [`parse_jsonl`], but a line that is not valid UTF-8, not a JSON object, or lacks a column
/// is skipped and listed instead of failing the whole file. Fails only when no record is left.
pub fn parse_jsonl_skipping_bad_lines(
    file: &str,
    bytes: &[u8],
    columns: &Columns,
) -> Result<ParsedRecords> {
    parse_lines(file, bytes, columns, true)
}

fn parse_lines(
    file: &str,
    bytes: &[u8],
    columns: &Columns,
    skip_bad_lines: bool,
) -> Result<ParsedRecords> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    let mut offset = if bytes.starts_with(BOM) { BOM.len() } else { 0 };
    let mut parsed = ParsedRecords {
        records: Vec::new(),
        bad_lines: Vec::new(),
    };
    for (index, raw) in bytes[offset..].split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        match parse_line(file, line, offset, raw, columns) {
            Ok(Some(record)) => parsed.records.push(record),
            Ok(None) => {}
            Err(e) if skip_bad_lines => parsed.bad_lines.push(BadLine {
                line,
                error: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
        offset += raw.len() + 1;
    }
    if parsed.records.is_empty() {
        let msg = match parsed.bad_lines.first() {
            None => "the file is empty: no JSON lines to train on".to_string(),
            Some(first) => format!(
                "all {} non-blank lines are bad, the first: {}",
                parsed.bad_lines.len(),
                first.error
            ),
        };
        return Err(Error::format(file, msg));
    }
    Ok(parsed)
}

/// How records become training examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExampleOptions {
    /// Prompt tokens kept (the first ones, as ChatGLM's p-tuning keeps them).
    pub max_source_length: usize,
    /// Answer tokens kept, EOS included: the answer is cut to `max_target_length - 1` tokens,
    /// then EOS is appended.
    pub max_target_length: usize,
    /// The system message for every record; `None` keeps the template's default.
    pub system: Option<String>,
}

/// One training example: `labels[i]` is the target of position `i` (the shift to next-token
/// prediction happens in the loss, as in `transformers`), [`IGNORE_INDEX`] on the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// 1-based line of the record in its data file (for messages about the example).
    pub line: usize,
}

/// The examples of a data file and what happened on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Examples {
    pub examples: Vec<Example>,
    /// Examples whose prompt or answer was cut to the maximum length.
    pub truncated: usize,
    /// Examples whose prompt was cut to `max_source_length`.
    pub truncated_source: usize,
    /// Examples whose answer was cut to `max_target_length`.
    pub truncated_target: usize,
    /// Records skipped because their prompt or response is empty.
    pub skipped_empty: usize,
}

impl Examples {
    /// "N of M examples truncated (...)", or `None` when none was.
    pub fn truncation_report(&self, options: &ExampleOptions) -> Option<String> {
        (self.truncated > 0).then(|| {
            format!(
                "{} of {} examples truncated ({} with the prompt over max_source_length = {} \
                 tokens, {} with the answer over max_target_length = {} tokens, EOS included)",
                self.truncated,
                self.examples.len(),
                self.truncated_source,
                options.max_source_length,
                self.truncated_target,
                options.max_target_length
            )
        })
    }
}

/// Tokenizes records into examples: `input_ids` = prompt ids (BOS first where the tokenizer adds
/// one and the prompt does not already start with it; cut to `max_source_length`) + answer ids
/// (cut to `max_target_length - 1`) + EOS, where the answer is the template's answer part (the
/// response and the template's end-of-turn text).
/// EOS is not appended a second time when the answer already ends with it. `labels` are
/// [`IGNORE_INDEX`] on the prompt and the ids themselves on answer and EOS. Special tokens in
/// the rendered text are parsed (as `transformers` tokenizers do).
pub fn tokenize_records(
    file: &str,
    records: &[Record],
    template: &PromptTemplate,
    tokenizer: &Tokenizer,
    options: &ExampleOptions,
) -> Result<Examples> {
    let eos = tokenizer.eos_id().ok_or_else(|| {
        Error::Invalid(
            "the tokenizer has no EOS token, which training appends to every answer".into(),
        )
    })?;
    if options.max_source_length == 0 || options.max_target_length == 0 {
        return Err(Error::Invalid(
            "max_source_length and max_target_length must be at least 1".into(),
        ));
    }
    let bos = tokenizer.bos_id().filter(|_| tokenizer.add_bos());
    let mut out = Examples {
        examples: Vec::with_capacity(records.len()),
        truncated: 0,
        truncated_source: 0,
        truncated_target: 0,
        skipped_empty: 0,
    };
    for record in records {
        if record.query.is_empty() || record.response.is_empty() {
            out.skipped_empty += 1;
            continue;
        }
        let conversation = Conversation {
            system: options.system.clone(),
            history: record.history.clone(),
            query: record.query.clone(),
        };
        let parts = template
            .training_parts(&conversation, &record.response)
            .map_err(|e| at_line(file, record.line, e.to_string()))?;
        let mut prompt_ids = tokenizer.encode(&parts.prompt, true)?;
        // A chat template may write the BOS token itself (`{{ bos_token }}`).
        if let Some(bos) = bos.filter(|&b| prompt_ids.first() != Some(&b)) {
            prompt_ids.insert(0, bos);
        }
        let mut answer_ids = tokenizer.encode(&parts.answer, true)?;
        let cut_source = prompt_ids.len() > options.max_source_length;
        let cut_target = answer_ids.len() > options.max_target_length - 1;
        prompt_ids.truncate(options.max_source_length);
        answer_ids.truncate(options.max_target_length - 1);
        if answer_ids.last() != Some(&eos) {
            answer_ids.push(eos);
        }
        out.truncated += usize::from(cut_source || cut_target);
        out.truncated_source += usize::from(cut_source);
        out.truncated_target += usize::from(cut_target);
        let labels = std::iter::repeat_n(IGNORE_INDEX, prompt_ids.len())
            .chain(answer_ids.iter().map(|&id| i64::from(id)))
            .collect();
        prompt_ids.extend(answer_ids);
        out.examples.push(Example {
            input_ids: prompt_ids,
            labels,
            line: record.line,
        });
    }
    if out.examples.is_empty() {
        return Err(Error::format(
            file,
            format!(
                "no usable examples: all {} records have an empty prompt or response",
                records.len()
            ),
        ));
    }
    Ok(out)
}

/// Reads a JSON-lines file and tokenizes it (see [`parse_jsonl`] and [`tokenize_records`]).
#[cfg(not(target_arch = "wasm32"))]
pub fn load_examples(
    path: impl AsRef<std::path::Path>,
    columns: &Columns,
    template: &PromptTemplate,
    tokenizer: &Tokenizer,
    options: &ExampleOptions,
) -> Result<Examples> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = path.display().to_string();
    let records = parse_jsonl(&file, &bytes, columns)?;
    tokenize_records(&file, &records, template, tokenizer, options)
}

/// Examples padded to one length, row-major `[batch_size, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Right-pads examples to the longest one with `pad_id`. Padded label positions get
/// [`IGNORE_INDEX`] when `ignore_pad_token_for_loss`, else `pad_id` (so the loss also trains on
/// padding, as the ChatGLM code does with the flag off). Only the padding is affected: a real
/// answer token equal to `pad_id` (EOS is often the pad token) keeps its label.
pub fn collate(examples: &[&Example], pad_id: u32, ignore_pad_token_for_loss: bool) -> Batch {
    let seq_len = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let pad_label = if ignore_pad_token_for_loss {
        IGNORE_INDEX
    } else {
        i64::from(pad_id)
    };
    let cells = examples.len() * seq_len;
    let mut batch = Batch {
        batch_size: examples.len(),
        seq_len,
        input_ids: Vec::with_capacity(cells),
        attention_mask: Vec::with_capacity(cells),
        labels: Vec::with_capacity(cells),
    };
    for example in examples {
        let pad = seq_len - example.input_ids.len();
        batch.input_ids.extend(&example.input_ids);
        batch.input_ids.extend(std::iter::repeat_n(pad_id, pad));
        batch
            .attention_mask
            .extend(std::iter::repeat_n(1, example.input_ids.len()));
        batch.attention_mask.extend(std::iter::repeat_n(0, pad));
        batch.labels.extend(&example.labels);
        batch.labels.extend(std::iter::repeat_n(pad_label, pad));
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"content": "a", "summary": "b"}"#;

    fn error(bytes: &[u8]) -> String {
        parse_jsonl("d.jsonl", bytes, &Columns::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_missing_column_lists_the_columns_the_line_has() {
        let msg = error(br#"{"prompt": "a", "summary": "b"}"#);
        assert_eq!(
            msg,
            "d.jsonl:1: missing column `content` (the line has columns `prompt`, `summary`)"
        );
        let msg = error(b"{}");
        assert_eq!(
            msg,
            "d.jsonl:1: missing column `content` (the line has no columns)"
        );
    }

    #[test]
    fn non_utf8_names_the_byte_in_the_line_and_in_the_file() {
        let bytes = [
            "\u{feff}".as_bytes(),
            GOOD.as_bytes(),
            b"\n{\"content\": \"x\xff",
        ]
        .concat();
        let msg = error(&bytes);
        let line_start = 3 + GOOD.len() + 1;
        let at = "{\"content\": \"x".len();
        assert_eq!(
            msg,
            format!(
                "d.jsonl:2: not valid UTF-8 at byte {at} of the line (byte {} of the file): \
                 invalid utf-8 sequence of 1 bytes from index {at}",
                line_start + at
            )
        );
    }

    #[test]
    fn bad_lines_are_skipped_and_listed_on_request() {
        let text = format!("{GOOD}\nnot json\n\n[1]\n{{\"content\": \"a\"}}\n{GOOD}\n");
        let bytes = [text.as_bytes(), b"\xff\n"].concat();
        assert!(error(&bytes).starts_with("d.jsonl:2: malformed JSON"));
        let parsed =
            parse_jsonl_skipping_bad_lines("d.jsonl", &bytes, &Columns::default()).unwrap();
        let lines: Vec<usize> = parsed.records.iter().map(|r| r.line).collect();
        assert_eq!(lines, [1, 6]);
        let bad: Vec<usize> = parsed.bad_lines.iter().map(|b| b.line).collect();
        assert_eq!(bad, [2, 4, 5, 7]);
        assert!(parsed.bad_lines[0]
            .error
            .starts_with("d.jsonl:2: malformed JSON"));
        assert!(parsed.bad_lines[2]
            .error
            .contains("missing column `summary`"));
        assert!(parsed.bad_lines[3].error.contains("not valid UTF-8"));
    }

    #[test]
    fn a_file_of_bad_lines_only_is_an_error_naming_the_first() {
        let msg = parse_jsonl_skipping_bad_lines("d.jsonl", b"\nnope\n[]\n", &Columns::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("d.jsonl: all 2 non-blank lines are bad, the first: d.jsonl:2:"),
            "{msg}"
        );
        let msg = parse_jsonl_skipping_bad_lines("d.jsonl", b" \n", &Columns::default())
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "d.jsonl: the file is empty: no JSON lines to train on");
    }

    #[test]
    fn truncation_report_counts_source_and_target_cuts() {
        let example = Example {
            input_ids: vec![1],
            labels: vec![1],
            line: 1,
        };
        let mut examples = Examples {
            examples: vec![example; 5],
            truncated: 0,
            truncated_source: 0,
            truncated_target: 0,
            skipped_empty: 0,
        };
        let options = ExampleOptions {
            max_source_length: 8,
            max_target_length: 4,
            system: None,
        };
        assert_eq!(examples.truncation_report(&options), None);
        (
            examples.truncated,
            examples.truncated_source,
            examples.truncated_target,
        ) = (3, 2, 2);
        assert_eq!(
            examples.truncation_report(&options).unwrap(),
            "3 of 5 examples truncated (2 with the prompt over max_source_length = 8 tokens, \
             2 with the answer over max_target_length = 4 tokens, EOS included)"
        );
    }
}
