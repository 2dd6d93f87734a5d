//! Generation as text: the prompt ids of a conversation, where a response ends (EOS, the
//! template's end-of-turn marker), and streaming the response as it grows.

use qlora_core::prompt::{Conversation, PromptTemplate};
use qlora_core::tokenizer::Tokenizer;
use qlora_core::Result;

/// The ids the model sees for `conversation`: the template's prompt, with BOS first when the
/// tokenizer adds one; special tokens written in the template (`<|im_start|>`) are parsed.
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    template: &PromptTemplate,
    conversation: &Conversation,
) -> Result<Vec<u32>> {
    let text = template.prompt(conversation)?;
    let mut ids: Vec<u32> = tokenizer
        .bos_id()
        .filter(|_| tokenizer.add_bos())
        .into_iter()
        .collect();
    ids.extend(tokenizer.encode(&text, true)?);
    Ok(ids)
}

/// Where a response ends: a stop token, or the template's end-of-turn marker appearing in the text
/// (YaYi's `<|End|>` is several ordinary tokens in some vocabularies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stops {
    /// EOS, and the end marker when it is one token.
    pub ids: Vec<u32>,
    /// The end marker as text (`<|End|>`, `<|im_end|>`), if the template writes one.
    pub marker: Option<String>,
}

impl Stops {
    /// The tokenizer's EOS and the template's end-of-turn text: what a training sample's answer
    /// part holds after the answer itself, trimmed.
    pub fn new(tokenizer: &Tokenizer, template: &PromptTemplate) -> Result<Stops> {
        let ending = template.training_parts(&Conversation::new("?"), "")?.answer;
        let marker = Some(ending.trim().to_string()).filter(|m| !m.is_empty());
        let mut ids: Vec<u32> = tokenizer.eos_id().into_iter().collect();
        if let Some(id) = marker.as_deref().and_then(|m| tokenizer.token_to_id(m)) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(Stops { ids, marker })
    }

    /// The response in `text`: everything before the end marker, and whether it was found.
    pub fn cut<'t>(&self, text: &'t str) -> (&'t str, bool) {
        match self.marker.as_deref().and_then(|m| text.find(m)) {
            Some(end) => (&text[..end], true),
            None => (text, false),
        }
    }
}

/// The response text of generated ids: decoded without special tokens, cut at the end marker and
/// trimmed of the whitespace the template puts around answers.
pub fn response_text(tokenizer: &Tokenizer, stops: &Stops, generated: &[u32]) -> Result<String> {
    let text = tokenizer.decode(generated, false)?;
    Ok(stops.cut(&text).0.trim().to_string())
}

/// Turns the growing list of generated ids into text pieces to print: a piece is released once
/// it cannot change any more, i.e. it does not end inside a multi-byte character (U+FFFD while
/// incomplete) and is not the start of the end marker.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    stops: &'a Stops,
    printed: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stops: &'a Stops) -> TextStream<'a> {
        TextStream {
            tokenizer,
            stops,
            printed: 0,
        }
    }

    /// The new printable text after `generated`, and whether the end marker has appeared (then
    /// generation should stop; the marker itself is never printed).
    pub fn push(&mut self, generated: &[u32]) -> Result<(String, bool)> {
        let text = self.tokenizer.decode(generated, false)?;
        let (response, ended) = self.stops.cut(&text);
        let mut stable = response.len();
        if !ended {
            stable = stable.min(self.undecided_from(response));
        }
        let piece = response
            .get(self.printed.min(stable)..stable)
            .unwrap_or_default()
            .to_string();
        self.printed = self.printed.max(stable);
        Ok((piece, ended))
    }

    /// The text not yet released when generation ends (a held-back prefix of the marker that
    /// never completed).
    pub fn finish(&mut self, generated: &[u32]) -> Result<String> {
        let text = self.tokenizer.decode(generated, false)?;
        let response = self.stops.cut(&text).0;
        let rest = response.get(self.printed..).unwrap_or_default().to_string();
        self.printed = response.len();
        Ok(rest)
    }

    /// Where the text that may still change starts: an incomplete character at the end, or a
    /// suffix that is a prefix of the end marker.
    fn undecided_from(&self, text: &str) -> usize {
        let mut from = text.len();
        if text.ends_with('\u{FFFD}') {
            from = text.trim_end_matches('\u{FFFD}').len();
        }
        if let Some(marker) = self.stops.marker.as_deref() {
            let candidate = &text[..from];
            if let Some(start) = (0..candidate.len())
                .filter(|&i| candidate.is_char_boundary(i))
                .find(|&i| marker.starts_with(&candidate[i..]))
            {
                from = start;
            }
        }
        from
    }
}
