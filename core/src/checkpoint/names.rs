//! The names a checkpoint stores an architecture's tensors under.

use super::TensorSource;
use crate::arch::ArchDescription;

/// How a checkpoint names the tensors of an architecture's description: as a `*ForCausalLM`
/// saves them (`transformer.h.0.…`), or, for a base model saved on its own (`BloomModel`),
/// without the base-model prefix. The token embedding tells which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredNames {
    /// The base-model prefix to drop from every name, for a checkpoint saved without it.
    strip_prefix: Option<&'static str>,
}

impl StoredNames {
    /// The naming of `source`: without the prefix only when the token embedding is missing
    /// under its full name and found without the prefix.
    pub fn of(source: &dyn TensorSource, description: &ArchDescription) -> StoredNames {
        let prefix = description.architecture().base_model_prefix();
        let embedding = &description.token_embedding().name;
        let bare_only = source.file_of(embedding).is_none()
            && embedding
                .strip_prefix(prefix)
                .is_some_and(|bare| source.file_of(bare).is_some());
        StoredNames {
            strip_prefix: bare_only.then_some(prefix),
        }
    }

    /// The name the tensor `name` (as the description gives it) has in the checkpoint.
    pub fn stored<'n>(&self, name: &'n str) -> &'n str {
        self.strip_prefix
            .and_then(|prefix| name.strip_prefix(prefix))
            .unwrap_or(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ModelConfig;
    use crate::checkpoint::{RawTensor, TensorInfo};
    use crate::Result;

    /// A checkpoint that holds names and nothing else.
    struct Names(Vec<&'static str>);

    impl TensorSource for Names {
        fn tensor_infos(&self) -> Vec<TensorInfo> {
            Vec::new()
        }
        fn read(&self, name: &str) -> Result<RawTensor> {
            Err(crate::Error::Invalid(format!("{name}: no data")))
        }
        fn file_of(&self, name: &str) -> Option<String> {
            self.0.contains(&name).then(|| "test".into())
        }
    }

    fn bloom() -> ArchDescription {
        let config = ModelConfig::parse(
            r#"{"model_type": "bloom", "vocab_size": 512, "hidden_size": 64, "n_layer": 1,
                "n_head": 4, "layer_norm_epsilon": 1e-5}"#,
            "test",
        )
        .unwrap();
        config.describe()
    }

    #[test]
    fn names_keep_the_prefix_unless_only_the_bare_embedding_is_stored() {
        let description = bloom();
        let full = StoredNames::of(
            &Names(vec!["transformer.word_embeddings.weight"]),
            &description,
        );
        assert_eq!(
            full.stored("transformer.h.0.dense.weight"),
            "transformer.h.0.dense.weight"
        );
        let bare = StoredNames::of(&Names(vec!["word_embeddings.weight"]), &description);
        assert_eq!(
            bare.stored("transformer.h.0.dense.weight"),
            "h.0.dense.weight"
        );
        // A name outside the base model (a separate LM head) keeps its name.
        assert_eq!(bare.stored("lm_head.weight"), "lm_head.weight");
        // Both stored: the full names win.
        let both = StoredNames::of(
            &Names(vec![
                "transformer.word_embeddings.weight",
                "word_embeddings.weight",
            ]),
            &description,
        );
        assert_eq!(both, full);
        // Neither: names as described (the read then says what is missing).
        assert_eq!(StoredNames::of(&Names(vec![]), &description), full);
    }
}
