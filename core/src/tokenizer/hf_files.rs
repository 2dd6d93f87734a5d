//! The parts of a Hugging Face tokenizer directory beside `tokenizer.json`: which strings are
//! the BOS/EOS/PAD/UNK tokens, whether BOS is added, and the chat template.

use crate::{Error, Result};
use serde_json::Value;

/// Special-token strings and template of a Hugging Face tokenizer directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokenNames {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
    /// `add_bos_token` of `tokenizer_config.json` (false when absent).
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// A token entry is either the token string or an `AddedToken` object with a `content` field.
fn token_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl SpecialTokenNames {
    /// Reads the contents of `tokenizer_config.json` and `special_tokens_map.json` (either may be
    /// absent). The config wins where both name a token. `dir` names the files in errors.
    pub fn from_json(
        dir: &str,
        tokenizer_config: Option<&[u8]>,
        special_tokens_map: Option<&[u8]>,
    ) -> Result<SpecialTokenNames> {
        let parse = |file: &str, bytes: Option<&[u8]>| -> Result<Value> {
            match bytes {
                None => Ok(Value::Null),
                Some(b) => serde_json::from_slice(b)
                    .map_err(|e| Error::format(format!("{dir}/{file}"), format!("bad JSON: {e}"))),
            }
        };
        let config = parse("tokenizer_config.json", tokenizer_config)?;
        let map = parse("special_tokens_map.json", special_tokens_map)?;
        let token = |key: &str| {
            config
                .get(key)
                .and_then(token_string)
                .or_else(|| map.get(key).and_then(token_string))
        };
        let chat_template = match config.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            // Newer configs hold several named templates; "default" is the chat one.
            Some(Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            Some(other) => {
                return Err(Error::format(
                    format!("{dir}/tokenizer_config.json"),
                    format!("`chat_template` is neither a string nor a list: {other}"),
                ))
            }
        };
        Ok(SpecialTokenNames {
            bos: token("bos_token"),
            eos: token("eos_token"),
            pad: token("pad_token"),
            unk: token("unk_token"),
            add_bos: config
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            chat_template,
        })
    }

    /// Reads `tokenizer_config.json` and `special_tokens_map.json` of `dir` where they exist.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_hf_dir(dir: &std::path::Path) -> Result<SpecialTokenNames> {
        let read = |file: &str| -> Result<Option<Vec<u8>>> {
            let path = dir.join(file);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(path, e)),
            }
        };
        let config = read("tokenizer_config.json")?;
        let map = read("special_tokens_map.json")?;
        SpecialTokenNames::from_json(
            &dir.display().to_string(),
            config.as_deref(),
            map.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_wins_over_map_and_objects_give_their_content() {
        let config = br#"{"eos_token": {"content": "</s>", "lstrip": false}, "add_bos_token": true,
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#;
        let map = br#"{"bos_token": "<s>", "eos_token": "<eos>", "pad_token": "<pad>"}"#;
        let names = SpecialTokenNames::from_json("d", Some(config), Some(map)).unwrap();
        assert_eq!(names.bos.as_deref(), Some("<s>"));
        assert_eq!(names.eos.as_deref(), Some("</s>"));
        assert_eq!(names.pad.as_deref(), Some("<pad>"));
        assert_eq!(names.unk, None);
        assert!(names.add_bos);
        assert_eq!(names.chat_template.as_deref(), Some("D"));
    }

    #[test]
    fn bad_json_names_the_file() {
        let msg = SpecialTokenNames::from_json("d", None, Some(b"{"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("d/special_tokens_map.json"), "{msg}");
    }
}
