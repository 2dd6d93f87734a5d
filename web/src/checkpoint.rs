//! A full-precision checkpoint opened from loaded files, as the inspector needs it: the tensor
//! source (core's readers), the model's config when there is one, and the tensors it can
//! inspect.

use qlora_core::arch::ModelConfig;
use qlora_core::checkpoint::{open_in_memory, BoxedSource, TensorInfo};
use qlora_core::{Error, Result};

use crate::files::{FileSet, CONFIG_FILE};

pub struct Checkpoint {
    /// What was loaded (a folder, a URL, a file name), for messages.
    pub label: String,
    pub source: BoxedSource,
    /// `config.json`, needed to inspect the whole model (it says which weights are quantized).
    pub config: Option<ModelConfig>,
    /// The float tensors, by name: what can be inspected one by one.
    pub float_tensors: Vec<TensorInfo>,
}

impl Checkpoint {
    /// Opens the checkpoint among `set`'s files (see `open_in_memory`) and parses its
    /// `config.json` if there is one. Errors name the file at fault.
    pub fn open(set: FileSet) -> Result<Checkpoint> {
        let FileSet { label, mut files } = set;
        let config = match files.remove(CONFIG_FILE) {
            Some(bytes) => {
                let text = String::from_utf8(bytes)
                    .map_err(|e| Error::format(CONFIG_FILE, format!("not UTF-8 text: {e}")))?;
                Some(ModelConfig::parse(&text, CONFIG_FILE)?)
            }
            None => None,
        };
        let source = open_in_memory(&label, files)?;
        let float_tensors: Vec<TensorInfo> = source
            .tensor_infos()
            .into_iter()
            .filter(|t| t.dtype.is_float() && t.numel() > 0)
            .collect();
        if float_tensors.is_empty() {
            return Err(Error::format(
                &label,
                "the checkpoint holds no float tensor",
            ));
        }
        Ok(Checkpoint {
            label,
            source,
            config,
            float_tensors,
        })
    }

    /// The tensor to show first: the first weight a 4-bit load quantizes, or the first float
    /// tensor when there is no config.
    pub fn default_tensor(&self) -> &str {
        let quantized = self.config.as_ref().and_then(|c| {
            c.describe()
                .linears()
                .first()
                .map(|l| l.weight_name())
                .filter(|name| self.float_tensors.iter().any(|t| &t.name == name))
        });
        match quantized {
            Some(name) => self
                .float_tensors
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.name.as_str())
                .expect("filtered above"),
            None => &self.float_tensors[0].name,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn golden(name: &str) -> Vec<u8> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/golden/");
        std::fs::read(format!("{path}{name}")).unwrap()
    }

    fn tiny_bloom(with_config: bool) -> FileSet {
        let mut files = BTreeMap::from([(
            "model.safetensors".to_string(),
            golden("tiny-bloom/model.safetensors"),
        )]);
        if with_config {
            files.insert(CONFIG_FILE.into(), golden("tiny-bloom/config.json"));
        }
        FileSet {
            label: "tiny-bloom".into(),
            files,
        }
    }

    #[test]
    fn tiny_bloom_with_and_without_config() {
        let c = Checkpoint::open(tiny_bloom(true)).unwrap();
        assert!(c.config.is_some());
        assert_eq!(
            c.default_tensor(),
            "transformer.h.0.self_attention.query_key_value.weight"
        );
        let bare = Checkpoint::open(tiny_bloom(false)).unwrap();
        assert!(bare.config.is_none());
        assert_eq!(bare.default_tensor(), bare.float_tensors[0].name);
    }

    #[test]
    fn a_bad_config_or_checkpoint_names_the_file() {
        let mut set = tiny_bloom(true);
        set.files
            .insert(CONFIG_FILE.into(), b"{\"model_type\": ".to_vec());
        let err = Checkpoint::open(set).err().unwrap().to_string();
        assert!(err.starts_with("config.json: "), "{err}");

        let mut set = tiny_bloom(false);
        let model = set.files.get_mut("model.safetensors").unwrap();
        model.truncate(model.len() / 2);
        let err = Checkpoint::open(set).err().unwrap().to_string();
        assert!(err.starts_with("model.safetensors: "), "{err}");
    }
}
