//! What the chat page makes of loaded files, in plain Rust (tested natively): a model directory
//! (config, checkpoint, tokenizer) and a PEFT adapter directory, and the prompt of a
//! conversation. The GPU side is `ui::chat`.

use qlora_core::arch::{Architecture, ModelConfig};
use qlora_core::checkpoint::{open_in_memory, BoxedSource};
use qlora_core::peft::{self, LoraAdapter};
use qlora_core::prompt::{Conversation, PromptTemplate};
use qlora_core::response::{prompt_ids, Stops};
use qlora_core::tokenizer::{SpecialTokenNames, Tokenizer};
use qlora_core::{Error, Result};

use crate::files::{FileSet, CONFIG_FILE};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";

/// The files a model directory holds beside its checkpoint and config.json.
pub const MODEL_SIDE_FILES: &[&str] = &[TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE];

/// A model ready to go to the GPU, with what turns text into its prompts.
pub struct ChatModel {
    pub label: String,
    pub config: ModelConfig,
    pub source: BoxedSource,
    pub tokenizer: Tokenizer,
    pub template: PromptTemplate,
    pub stops: Stops,
}

impl ChatModel {
    /// Opens a model directory's files: `config.json`, `tokenizer.json` (with
    /// `tokenizer_config.json` and `special_tokens_map.json` where present) and the checkpoint.
    /// The prompt template is chosen as `qlora predict` chooses it without `--prompt_template`:
    /// YaYi's for BLOOM, else the tokenizer's chat template.
    pub fn open(set: FileSet) -> Result<ChatModel> {
        let FileSet { label, mut files } = set;
        let missing = |name: &str| {
            Error::format(
                &label,
                format!("{name} is missing: load the model's whole folder"),
            )
        };
        let config_bytes = files
            .remove(CONFIG_FILE)
            .ok_or_else(|| missing(CONFIG_FILE))?;
        let config_text = String::from_utf8(config_bytes)
            .map_err(|e| Error::format(CONFIG_FILE, format!("not UTF-8 text: {e}")))?;
        let config = ModelConfig::parse(&config_text, CONFIG_FILE)?;
        let tokenizer_json = files
            .remove(TOKENIZER_FILE)
            .ok_or_else(|| missing(TOKENIZER_FILE))?;
        let names = SpecialTokenNames::from_json(
            &label,
            files.remove(TOKENIZER_CONFIG_FILE).as_deref(),
            files.remove(SPECIAL_TOKENS_FILE).as_deref(),
        )?;
        let tokenizer = Tokenizer::from_tokenizer_json(TOKENIZER_FILE, &tokenizer_json, &names)?;
        let template = match config.architecture() {
            Architecture::Bloom => PromptTemplate::yayi(),
            _ => PromptTemplate::from_tokenizer(&tokenizer).map_err(|_| {
                Error::format(
                    TOKENIZER_CONFIG_FILE,
                    "no chat template (`chat_template`) to build prompts with",
                )
            })?,
        };
        let stops = Stops::new(&tokenizer, &template)?;
        let source = open_in_memory(&label, files)?;
        Ok(ChatModel {
            label,
            config,
            source,
            tokenizer,
            template,
            stops,
        })
    }

    /// The prompt ids of `conversation`.
    pub fn prompt(&self, conversation: &Conversation) -> Result<Vec<u32>> {
        prompt_ids(&self.tokenizer, &self.template, conversation)
    }
}

/// The files of an adapter directory.
pub const ADAPTER_FILES: &[&str] = &[peft::CONFIG_FILE, peft::WEIGHTS_FILE];

/// A PEFT adapter from `adapter_config.json` and `adapter_model.safetensors`.
pub fn open_adapter(mut set: FileSet) -> Result<LoraAdapter> {
    let mut take = |name: &str| {
        set.files.remove(name).ok_or_else(|| {
            Error::format(
                &set.label,
                format!("{name} is missing: load the adapter's folder"),
            )
        })
    };
    let config = take(peft::CONFIG_FILE)?;
    let weights = take(peft::WEIGHTS_FILE)?;
    let config = String::from_utf8(config)
        .map_err(|e| Error::format(peft::CONFIG_FILE, format!("not UTF-8 text: {e}")))?;
    LoraAdapter::from_bytes(&config, weights)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn golden(name: &str) -> Vec<u8> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/golden/");
        std::fs::read(format!("{path}{name}")).unwrap()
    }

    fn set(files: &[(&str, Vec<u8>)]) -> FileSet {
        FileSet {
            label: "test".into(),
            files: files
                .iter()
                .map(|(n, b)| (n.to_string(), b.clone()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn a_model_without_tokenizer_and_a_broken_adapter_say_what_is_wrong() {
        let err = ChatModel::open(set(&[
            ("config.json", golden("tiny-bloom/config.json")),
            ("model.safetensors", golden("tiny-bloom/model.safetensors")),
        ]))
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("tokenizer.json is missing"), "{err}");

        let adapter = open_adapter(set(&[
            (
                "adapter_config.json",
                golden("tiny-bloom-lora/adapter_config.json"),
            ),
            (
                "adapter_model.safetensors",
                b"\x08\0\0\0\0\0\0\0{}".to_vec(),
            ),
        ]));
        assert!(adapter.is_err());
        let adapter = open_adapter(set(&[
            (
                "adapter_config.json",
                golden("tiny-bloom-lora/adapter_config.json"),
            ),
            (
                "adapter_model.safetensors",
                golden("tiny-bloom-lora/adapter_model.safetensors"),
            ),
        ]))
        .unwrap();
        assert!(!adapter.modules.is_empty());
    }
}
