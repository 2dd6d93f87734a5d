//! Sharded checkpoints: `model.safetensors.index.json` or `pytorch_model.bin.index.json`,
//! `{"metadata": {"total_size": ..}, "weight_map": {tensor: shard file}}`, beside its shards.

use std::collections::BTreeMap;

use super::{BoxedSource, RawTensor, TensorInfo, TensorSource};
use crate::{Error, Result};

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

impl IndexFile {
    fn parse(index_label: &str, index_json: &[u8]) -> Result<IndexFile> {
        serde_json::from_slice(index_json).map_err(|e| {
            Error::format(
                index_label,
                format!("not a checkpoint index (`weight_map` of tensor → shard): {e}"),
            )
        })
    }
}

/// The tensors of every shard an index names, read from the shard that holds each.
pub struct ShardedCheckpoint {
    shards: Vec<BoxedSource>,
    /// Tensor → (shard number, its info).
    tensors: BTreeMap<String, (usize, TensorInfo)>,
}

impl ShardedCheckpoint {
    /// Reads the index (`index_label` names it in errors) and opens each shard it names once,
    /// through `open_shard(shard file name)`. Every tensor the index lists must be in its shard.
    pub fn from_index(
        index_label: &str,
        index_json: &[u8],
        mut open_shard: impl FnMut(&str) -> Result<BoxedSource>,
    ) -> Result<Self> {
        let index = IndexFile::parse(index_label, index_json)?;
        let mut shard_numbers: BTreeMap<&str, usize> = BTreeMap::new();
        let mut shards = Vec::new();
        // The tensors of each opened shard, by name, to check the index against.
        let mut shard_tensors: Vec<BTreeMap<String, TensorInfo>> = Vec::new();
        let mut tensors = BTreeMap::new();
        for (name, shard_name) in &index.weight_map {
            let number = match shard_numbers.get(shard_name.as_str()) {
                Some(&n) => n,
                None => {
                    let shard = open_shard(shard_name)?;
                    shard_tensors.push(
                        shard
                            .tensor_infos()
                            .into_iter()
                            .map(|t| (t.name.clone(), t))
                            .collect(),
                    );
                    shards.push(shard);
                    shard_numbers.insert(shard_name, shards.len() - 1);
                    shards.len() - 1
                }
            };
            let info = shard_tensors[number].get(name).cloned().ok_or_else(|| {
                Error::tensor(
                    index_label,
                    name,
                    format!("the index puts it in shard `{shard_name}`, which does not hold it"),
                )
            })?;
            tensors.insert(name.clone(), (number, info));
        }
        Ok(ShardedCheckpoint { shards, tensors })
    }

    /// The shard files the index names, each once, sorted (what to fetch before
    /// [`Self::from_index`] when the shards are not at hand).
    pub fn shard_files(index_label: &str, index_json: &[u8]) -> Result<Vec<String>> {
        let index = IndexFile::parse(index_label, index_json)?;
        let shards: std::collections::BTreeSet<String> = index.weight_map.into_values().collect();
        Ok(shards.into_iter().collect())
    }

    /// Opens the index at `index_path` and its shards, found in the same directory.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(index_path: &std::path::Path) -> Result<Self> {
        let label = index_path.display().to_string();
        let json = std::fs::read(index_path).map_err(|e| Error::io(index_path, e))?;
        let dir = index_path.parent().unwrap_or(std::path::Path::new("."));
        Self::from_index(&label, &json, |shard| {
            if shard.contains(['/', '\\']) || shard == ".." {
                return Err(Error::format(
                    &label,
                    format!("shard `{shard}` is not a file name in the index's directory"),
                ));
            }
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(Error::format(
                    &label,
                    format!(
                        "shard `{shard}` named by the index is missing ({})",
                        path.display()
                    ),
                ));
            }
            super::open::open_file(&path)
        })
    }
}

impl TensorSource for ShardedCheckpoint {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.tensors
            .values()
            .map(|(_, info)| info.clone())
            .collect()
    }

    fn read(&self, name: &str) -> Result<RawTensor> {
        match self.tensors.get(name) {
            Some(&(shard, _)) => self.shards[shard].read(name),
            None => Err(Error::Invalid(format!(
                "tensor `{name}` is not in the checkpoint index"
            ))),
        }
    }

    fn file_of(&self, name: &str) -> Option<String> {
        let &(shard, _) = self.tensors.get(name)?;
        self.shards[shard].file_of(name)
    }
}
