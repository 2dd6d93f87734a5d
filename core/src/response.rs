//! Generation as text, shared by the native CLI and the browser chat: the prompt ids of a
//! conversation, where a response ends (EOS, the template's end-of-turn marker), and streaming
//! the response as it grows.

use crate::prompt::{Conversation, PromptTemplate};
use crate::tokenizer::Tokenizer;
use crate::Result;

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

/// The response text of generated ids: decoded without special tokens, cut at the end marker,
/// without a character the token limit cut short (see [`complete_chars`]) and trimmed of the
/// whitespace the template puts around answers.
pub fn response_text(tokenizer: &Tokenizer, stops: &Stops, generated: &[u32]) -> Result<String> {
    let text = tokenizer.decode(generated, false)?;
    Ok(final_response(stops, &text).trim().to_string())
}

/// The response in the text of a finished generation: cut at the end marker, or, where the
/// marker never came, without an incomplete last character.
fn final_response<'t>(stops: &Stops, text: &'t str) -> &'t str {
    match stops.cut(text) {
        (response, true) => response,
        (response, false) => complete_chars(response),
    }
}

/// `text` without the U+FFFD that decoding leaves at the end for the bytes of a multi-byte
/// character whose remaining bytes have not been generated (yet, or ever: the token limit).
/// Text that ended at the end marker is complete and never goes through this.
fn complete_chars(text: &str) -> &str {
    text.trim_end_matches('\u{FFFD}')
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
    /// never completed; never an incomplete last character).
    pub fn finish(&mut self, generated: &[u32]) -> Result<String> {
        let text = self.tokenizer.decode(generated, false)?;
        let response = final_response(self.stops, &text);
        let rest = response.get(self.printed..).unwrap_or_default().to_string();
        self.printed = response.len();
        Ok(rest)
    }

    /// Where the text that may still change starts: an incomplete character at the end, or a
    /// suffix that is a prefix of the end marker.
    fn undecided_from(&self, text: &str) -> usize {
        let mut from = complete_chars(text).len();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::SpecialTokenNames;

    /// A byte-fallback tokenizer: `a`, `b`, and the three bytes of `你` (E4 BD A0) as tokens
    /// 2, 3, 4, so a token limit can stop in the middle of the character.
    fn byte_tokenizer() -> Tokenizer {
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": true, "ignore_merges": false,
                "vocab": {"a": 0, "b": 1, "<0xE4>": 2, "<0xBD>": 3, "<0xA0>": 4}, "merges": []}
        });
        Tokenizer::from_tokenizer_json(
            "bytes",
            json.to_string().as_bytes(),
            &SpecialTokenNames::default(),
        )
        .unwrap()
    }

    /// What streaming prints over the whole generation, piece by piece.
    fn streamed(tokenizer: &Tokenizer, stops: &Stops, generated: &[u32]) -> String {
        let mut stream = TextStream::new(tokenizer, stops);
        let mut text = String::new();
        for n in 1..=generated.len() {
            text += &stream.push(&generated[..n]).unwrap().0;
        }
        text + &stream.finish(generated).unwrap()
    }

    #[test]
    fn a_character_cut_by_the_token_limit_is_dropped_like_the_stream_drops_it() {
        let tokenizer = byte_tokenizer();
        let stops = Stops {
            ids: vec![],
            marker: None,
        };
        let cut = [0, 1, 2, 3]; // "ab" + the first two bytes of 你
        assert!(tokenizer.decode(&cut, false).unwrap().ends_with('\u{FFFD}'));
        assert_eq!(response_text(&tokenizer, &stops, &cut).unwrap(), "ab");
        assert_eq!(streamed(&tokenizer, &stops, &cut), "ab");

        let whole = [0, 2, 3, 4, 1];
        assert_eq!(response_text(&tokenizer, &stops, &whole).unwrap(), "a你b");
        assert_eq!(streamed(&tokenizer, &stops, &whole), "a你b");
    }
}
