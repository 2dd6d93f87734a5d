//! Which file of a model directory is its checkpoint, and how a file's name says to read it:
//! the same rules for files on disk (`open_checkpoint`, native) and for files in memory
//! ([`open_in_memory`]: what a browser's file picker or download hands over).

use std::collections::BTreeMap;

use super::bytes::FileBytes;
use super::safetensors::SafetensorsFile;
use super::sharded::ShardedCheckpoint;
use super::torch::TorchFile;
use super::BoxedSource;
use crate::{Error, Result};

/// What a model directory may hold, in order of preference (the order transformers loads).
pub const CHECKPOINT_FILES: [&str; 4] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

/// How to read a checkpoint file, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileKind {
    /// `*.index.json`: a sharded checkpoint's index.
    ShardIndex,
    /// `*.safetensors`.
    Safetensors,
    /// `*.bin`, `*.pt`, `*.pth`: `torch.save`.
    Torch,
    /// Any other name: by content (a zip or a pickle is torch, anything else safetensors).
    ByContent,
}

impl FileKind {
    pub(super) fn of(name: &str) -> FileKind {
        if name.ends_with(".index.json") {
            FileKind::ShardIndex
        } else if name.ends_with(".safetensors") {
            FileKind::Safetensors
        } else if [".bin", ".pt", ".pth"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            FileKind::Torch
        } else {
            FileKind::ByContent
        }
    }
}

/// Parses one checkpoint file (not an index: that needs its shards) as `kind` says.
pub(super) fn parse_file(kind: FileKind, label: String, bytes: FileBytes) -> Result<BoxedSource> {
    let torch = match kind {
        FileKind::ShardIndex => {
            return Err(Error::format(
                label,
                "a sharded checkpoint's index, not a checkpoint file",
            ))
        }
        FileKind::Safetensors => false,
        FileKind::Torch => true,
        FileKind::ByContent => bytes.starts_with(b"PK") || bytes.starts_with(&[0x80]),
    };
    Ok(if torch {
        Box::new(TorchFile::parse(label, bytes)?)
    } else {
        Box::new(SafetensorsFile::parse(label, bytes)?)
    })
}

/// Opens the checkpoint among `files` (file name → content; `label` names the set in errors):
/// the first of [`CHECKPOINT_FILES`] present, a sharded index with its shards taken from
/// `files`; failing those, the only `*.safetensors` or `*.index.json` file there is. Files the
/// checkpoint does not use are dropped.
pub fn open_in_memory(label: &str, mut files: BTreeMap<String, Vec<u8>>) -> Result<BoxedSource> {
    let name = match CHECKPOINT_FILES.iter().find(|f| files.contains_key(**f)) {
        Some(name) => name.to_string(),
        None => {
            let candidates: Vec<&String> = files
                .keys()
                .filter(|n| {
                    matches!(
                        FileKind::of(n),
                        FileKind::Safetensors | FileKind::ShardIndex
                    )
                })
                .collect();
            match candidates.as_slice() {
                [only] => only.to_string(),
                _ => {
                    let names: Vec<&str> = files.keys().map(String::as_str).collect();
                    return Err(Error::format(
                        label,
                        format!(
                            "no checkpoint among the files ({}): expected one of {}, or a single \
                             *.safetensors file",
                            if names.is_empty() {
                                "none".to_string()
                            } else {
                                names.join(", ")
                            },
                            CHECKPOINT_FILES.join(", ")
                        ),
                    ));
                }
            }
        }
    };
    let bytes = files.remove(&name).expect("chosen among the keys");
    match FileKind::of(&name) {
        FileKind::ShardIndex => Ok(Box::new(ShardedCheckpoint::from_index(
            &name,
            &bytes,
            |shard| match files.remove(shard) {
                Some(shard_bytes) => parse_file(
                    FileKind::of(shard),
                    shard.to_string(),
                    FileBytes::Owned(shard_bytes),
                ),
                None => Err(Error::format(
                    &name,
                    format!("shard `{shard}` named by the index is not among the files"),
                )),
            },
        )?)),
        kind => parse_file(kind, name, FileBytes::Owned(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{SafetensorsWriter, TensorInfo, TensorSource};
    use crate::DType;

    /// A safetensors file holding `names`, each one f32 `[2]` tensor.
    fn safetensors(names: &[&str]) -> Vec<u8> {
        let plan: Vec<TensorInfo> = names
            .iter()
            .map(|n| TensorInfo {
                name: n.to_string(),
                dtype: DType::F32,
                shape: vec![2],
            })
            .collect();
        let mut w =
            SafetensorsWriter::new(std::io::Cursor::new(Vec::new()), "test", &plan).unwrap();
        while let Some(next) = w.expected().cloned() {
            w.write_tensor(&next.name, &[0u8; 8]).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn names(source: &BoxedSource) -> Vec<String> {
        source.tensor_infos().into_iter().map(|i| i.name).collect()
    }

    #[test]
    fn prefers_model_safetensors_and_drops_other_files() {
        let files = BTreeMap::from([
            ("config.json".to_string(), b"{}".to_vec()),
            ("other.safetensors".to_string(), safetensors(&["b"])),
            ("model.safetensors".to_string(), safetensors(&["a"])),
        ]);
        assert_eq!(names(&open_in_memory("m", files).unwrap()), ["a"]);
    }

    #[test]
    fn a_lone_safetensors_file_of_any_name() {
        let files = BTreeMap::from([("ref.safetensors".to_string(), safetensors(&["x", "y"]))]);
        assert_eq!(names(&open_in_memory("m", files).unwrap()), ["x", "y"]);
    }

    #[test]
    fn sharded_with_shards_from_the_files() {
        let index =
            br#"{"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#;
        let mut files = BTreeMap::from([
            ("model.safetensors.index.json".to_string(), index.to_vec()),
            ("s1.safetensors".to_string(), safetensors(&["a"])),
            ("s2.safetensors".to_string(), safetensors(&["b"])),
        ]);
        let source = open_in_memory("m", files.clone()).unwrap();
        assert_eq!(names(&source), ["a", "b"]);
        assert_eq!(source.file_of("b").as_deref(), Some("s2.safetensors"));

        files.remove("s2.safetensors");
        let err = open_in_memory("m", files).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors.index.json")
                && err.contains("`s2.safetensors`")
                && err.contains("not among the files"),
            "{err}"
        );
    }

    #[test]
    fn no_checkpoint_or_a_corrupt_one_names_the_files() {
        let files = BTreeMap::from([("config.json".to_string(), b"{}".to_vec())]);
        let err = open_in_memory("my model", files).err().unwrap().to_string();
        assert!(
            err.starts_with("my model: no checkpoint among the files (config.json)"),
            "{err}"
        );

        let files = BTreeMap::from([("model.safetensors".to_string(), b"garbage".to_vec())]);
        let err = open_in_memory("m", files).err().unwrap().to_string();
        assert!(err.starts_with("model.safetensors: truncated"), "{err}");
    }
}
