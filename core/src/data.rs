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
        None => Err(at_line(file, line, format!("missing column `{column}`"))),
        Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(at_line(
            file,
            line,
            format!("column `{column}` should be a string, not {other}"),
        )),
    }
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
        None => Err(at_line(file, line, format!("missing column `{column}`"))),
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

/// Reads JSON-lines data held in memory (`file` names it in messages). Blank lines are skipped;
/// every error names `file:line`.
pub fn parse_jsonl(file: &str, bytes: &[u8], columns: &Columns) -> Result<Vec<Record>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut records = Vec::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let text = std::str::from_utf8(raw)
            .map_err(|e| at_line(file, line, format!("not valid UTF-8 ({e})")))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
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
        records.push(Record {
            line,
            query: string_column(file, line, &row, &columns.prompt)?,
            response: string_column(file, line, &row, &columns.response)?,
            history,
        });
    }
    if records.is_empty() {
        return Err(Error::format(
            file,
            "the file is empty: no JSON lines to train on",
        ));
    }
    Ok(records)
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
}

/// The examples of a data file and what happened on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Examples {
    pub examples: Vec<Example>,
    /// Examples whose prompt or answer was cut to the maximum length.
    pub truncated: usize,
    /// Records skipped because their prompt or response is empty.
    pub skipped_empty: usize,
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
        let cut = prompt_ids.len() > options.max_source_length
            || answer_ids.len() > options.max_target_length - 1;
        prompt_ids.truncate(options.max_source_length);
        answer_ids.truncate(options.max_target_length - 1);
        if answer_ids.last() != Some(&eos) {
            answer_ids.push(eos);
        }
        out.truncated += usize::from(cut);
        let labels = std::iter::repeat_n(IGNORE_INDEX, prompt_ids.len())
            .chain(answer_ids.iter().map(|&id| i64::from(id)))
            .collect();
        prompt_ids.extend(answer_ids);
        out.examples.push(Example {
            input_ids: prompt_ids,
            labels,
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
