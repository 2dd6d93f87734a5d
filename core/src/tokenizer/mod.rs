//! Tokenizers: a Hugging Face `tokenizer.json` (through the `tokenizers` crate), or one rebuilt
//! from the metadata of a GGUF file so that it gives llama.cpp's ids.

mod from_gguf;
mod hf_files;

pub use hf_files::SpecialTokenNames;

use crate::{Error, Result};

/// Ids of the special tokens a training or chat loop needs; any of them may be absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
}

/// A text tokenizer with its special-token ids and, where its source has one, a chat template.
#[derive(Clone)]
pub struct Tokenizer {
    /// Where it came from, for error messages.
    name: String,
    /// Matches special tokens written in the text (llama.cpp's `special=true`).
    parsing_special: tokenizers::Tokenizer,
    /// The same tokenizer with special tokens encoded as plain text (`special=false`). A second
    /// copy because `tokenizers` keeps this switch as state of the tokenizer, not of a call.
    plain: tokenizers::Tokenizer,
    special: SpecialIds,
    /// Whether the model expects a BOS token in front of a prompt (GGUF `add_bos_token`).
    add_bos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl Tokenizer {
    fn new(
        name: String,
        parsing_special: tokenizers::Tokenizer,
        special: SpecialIds,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Tokenizer {
        let mut plain = parsing_special.clone();
        plain.set_encode_special_tokens(true);
        Tokenizer {
            name,
            parsing_special,
            plain,
            special,
            add_bos,
            chat_template,
        }
    }

    /// A tokenizer from the bytes of a `tokenizer.json`. The special ids are looked up by the
    /// token strings in `names` (from `tokenizer_config.json` / `special_tokens_map.json`, see
    /// [`SpecialTokenNames`]); a name that is not in the vocabulary is an error.
    pub fn from_tokenizer_json(
        name: impl Into<String>,
        json: &[u8],
        names: &SpecialTokenNames,
    ) -> Result<Tokenizer> {
        let name = name.into();
        // tokenizers 0.22 panics, rather than erroring, on a syntax error or invalid UTF-8
        // inside a `decoder` object; checking both first turns every malformed file into an error.
        let unusable = |e: &dyn std::fmt::Display| {
            Error::format(&name, format!("not a usable tokenizer.json: {e}"))
        };
        let text = std::str::from_utf8(json).map_err(|e| unusable(&e))?;
        serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| unusable(&e))?;
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| unusable(&e))?;
        let id_of = |token: &Option<String>| -> Result<Option<u32>> {
            token
                .as_deref()
                .map(|t| {
                    inner.token_to_id(t).ok_or_else(|| {
                        Error::format(
                            &name,
                            format!("special token `{t}` is not in the vocabulary"),
                        )
                    })
                })
                .transpose()
        };
        let special = SpecialIds {
            bos: id_of(&names.bos)?,
            eos: id_of(&names.eos)?,
            pad: id_of(&names.pad)?,
            unk: id_of(&names.unk)?,
        };
        Ok(Tokenizer::new(
            name,
            inner,
            special,
            names.add_bos,
            names.chat_template.clone(),
        ))
    }

    /// A `tokenizer.json` file, with the special tokens and chat template of the
    /// `tokenizer_config.json` and `special_tokens_map.json` beside it where present.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let json = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let names = SpecialTokenNames::from_hf_dir(dir)?;
        Tokenizer::from_tokenizer_json(path.display().to_string(), &json, &names)
    }

    /// A Hugging Face tokenizer directory (its `tokenizer.json`, see [`Tokenizer::from_file`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_hf_dir(dir: impl AsRef<std::path::Path>) -> Result<Tokenizer> {
        Tokenizer::from_file(dir.as_ref().join("tokenizer.json"))
    }

    /// The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata. Supported:
    /// `tokenizer.ggml.model = gpt2` (byte-level BPE) with `tokenizer.ggml.pre = smollm`; any
    /// other model or pre-tokenizer is an error that names it.
    pub fn from_gguf(gguf: &crate::gguf::Gguf) -> Result<Tokenizer> {
        let built = from_gguf::build(gguf)?;
        Ok(Tokenizer::new(
            gguf.name().to_string(),
            built.tokenizer,
            built.special,
            built.add_bos,
            built.chat_template,
        ))
    }

    /// Token ids of `text`, never with BOS/EOS added. With `parse_special`, special tokens
    /// written in the text (`<|im_end|>`) become their ids; without, they are tokenized as
    /// ordinary characters (llama.cpp's `special=true` / `special=false`).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let inner = if parse_special {
            &self.parsing_special
        } else {
            &self.plain
        };
        let encoding = inner
            .encode_fast(text, false)
            .map_err(|e| Error::format(&self.name, format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`. With `render_special`, special tokens appear as their text; without,
    /// they are left out (llama.cpp's `detokenize(ids, special)`). Bytes that do not form
    /// valid UTF-8 (a multi-byte character cut between tokens) become U+FFFD.
    pub fn decode(&self, ids: &[u32], render_special: bool) -> Result<String> {
        self.parsing_special
            .decode(ids, !render_special)
            .map_err(|e| Error::format(&self.name, format!("cannot decode ids: {e}")))
    }

    pub fn special_ids(&self) -> SpecialIds {
        self.special
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.special.pad
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.special.unk
    }

    /// Whether a prompt should start with BOS (the model's convention; `encode` never adds it).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The Jinja chat template of the source (GGUF `tokenizer.chat_template` or
    /// `tokenizer_config.json` `chat_template`), if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.parsing_special.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.parsing_special.token_to_id(token)
    }

    /// The vocabulary string of one id (byte-level form for BPE vocabularies: `Ġ` for a space).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.parsing_special.id_to_token(id)
    }

    /// The `tokenizer.json` of this tokenizer, so a GGUF-built one can be saved and reloaded.
    pub fn to_tokenizer_json(&self) -> Result<String> {
        self.parsing_special
            .to_string(false)
            .map_err(|e| Error::format(&self.name, format!("cannot serialize tokenizer: {e}")))
    }
}

#[cfg(test)]
mod tests;
