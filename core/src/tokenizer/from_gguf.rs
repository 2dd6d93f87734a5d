//! Rebuilds a GGUF file's tokenizer (`tokenizer.ggml.*` metadata) as a `tokenizers` pipeline that
//! gives the ids llama.cpp gives.

use super::SpecialIds;
use crate::gguf::Gguf;
use crate::{Error, Result};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

/// llama.cpp's `llama_token_type` values that change how a token is matched.
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

pub(super) struct Built {
    pub tokenizer: tokenizers::Tokenizer,
    pub special: SpecialIds,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// The pre-tokenizer llama.cpp applies for a `tokenizer.ggml.pre` value, as `tokenizers` steps.
fn pre_tokenizer(file: &str, pre: &str) -> Result<PreTokenizerWrapper> {
    match pre {
        // llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM: `\p{N}` (each digit its own piece), then the
        // GPT-2 regex, which is what ByteLevel's regex is; no prefix space.
        "smollm" => Ok(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into()),
        other => Err(Error::format(
            file,
            format!("unsupported tokenizer.ggml.pre `{other}` (supported: smollm)"),
        )),
    }
}

/// `a b` into (`a`, `b`), splitting at the first space after the first character as llama.cpp
/// does (a byte-level token never holds a literal space, but its first character could).
fn split_merge(file: &str, index: usize, merge: &str) -> Result<(String, String)> {
    merge
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c == ' ')
        .map(|(at, _)| (merge[..at].to_string(), merge[at + 1..].to_string()))
        .ok_or_else(|| {
            Error::format(
                file,
                format!("tokenizer.ggml.merges[{index}] `{merge}` has no space between its parts"),
            )
        })
}

pub(super) fn build(gguf: &Gguf) -> Result<Built> {
    let file = gguf.name();
    let model = gguf.require("tokenizer.ggml.model", Gguf::get_str)?;
    if model != "gpt2" {
        return Err(Error::format(
            file,
            format!("unsupported tokenizer.ggml.model `{model}` (supported: gpt2)"),
        ));
    }
    let pre = gguf.require("tokenizer.ggml.pre", Gguf::get_str)?;
    let pre_tokenizer = pre_tokenizer(file, pre)?;

    let tokens = gguf.require("tokenizer.ggml.tokens", Gguf::get_str_array)?;
    let n_tokens = u32::try_from(tokens.len())
        .map_err(|_| Error::format(file, "more tokens than u32 ids can number"))?;
    let token_types = match gguf.get_i32_array("tokenizer.ggml.token_type")? {
        Some(types) if types.len() != tokens.len() => {
            return Err(Error::format(
                file,
                format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    types.len(),
                    tokens.len()
                ),
            ))
        }
        Some(types) => types,
        None => vec![1; tokens.len()],
    };
    let merges = gguf
        .require("tokenizer.ggml.merges", Gguf::get_str_array)?
        .iter()
        .enumerate()
        .map(|(i, m)| split_merge(file, i, m))
        .collect::<Result<Vec<_>>>()?;

    // llama.cpp keeps the last id of a string that appears twice; so does this.
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.to_string(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::format(file, format!("cannot build the BPE vocabulary: {e}")))?;

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    // CONTROL and UNKNOWN tokens are matched in the text only when special tokens are parsed;
    // USER_DEFINED ones always (llama.cpp's `tokenizer_st_partition`).
    let added = |wanted: &[i32], special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, ty)| wanted.contains(ty))
            .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
            .collect()
    };
    tokenizer.add_special_tokens(&added(&[TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN], true));
    tokenizer.add_tokens(&added(&[TOKEN_TYPE_USER_DEFINED], false));

    let id = |key: &str| -> Result<Option<u32>> {
        match gguf.get_u32(key)? {
            Some(id) if id >= n_tokens => Err(Error::format(
                file,
                format!("metadata `{key}` = {id} is not below the vocabulary size {n_tokens}"),
            )),
            other => Ok(other),
        }
    };
    let special = SpecialIds {
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
    };
    // llama.cpp's default for BPE vocabularies when the key is absent is to add BOS.
    let add_bos = gguf
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(true);
    let chat_template = gguf.get_str("tokenizer.chat_template")?.map(str::to_string);
    Ok(Built {
        tokenizer,
        special,
        add_bos,
        chat_template,
    })
}
