//! Opening a checkpoint from a path, whatever its format.

use std::path::Path;

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

/// Opens a model directory (the first of [`CHECKPOINT_FILES`] it holds) or a single checkpoint
/// file (see [`open_file`]).
pub fn open_checkpoint(path: &Path) -> Result<BoxedSource> {
    if !path.is_dir() {
        return open_file(path);
    }
    match CHECKPOINT_FILES
        .iter()
        .map(|f| path.join(f))
        .find(|p| p.is_file())
    {
        Some(file) => open_file(&file),
        None => Err(Error::format(
            path.display(),
            format!(
                "no checkpoint in this directory: looked for {}",
                CHECKPOINT_FILES.join(", ")
            ),
        )),
    }
}

/// Opens one file: `*.index.json` as a sharded index, `*.safetensors` as safetensors,
/// `*.bin`/`*.pt`/`*.pth` as torch.save; any other name by its content (a zip or a pickle is
/// torch, anything else safetensors).
pub fn open_file(path: &Path) -> Result<BoxedSource> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(".index.json") {
        return Ok(Box::new(ShardedCheckpoint::open(path)?));
    }
    if name.ends_with(".safetensors") {
        return Ok(Box::new(SafetensorsFile::open(path)?));
    }
    if [".bin", ".pt", ".pth"]
        .iter()
        .any(|ext| name.ends_with(ext))
    {
        return Ok(Box::new(TorchFile::open(path)?));
    }
    let label = path.display().to_string();
    let bytes = FileBytes::map(path)?;
    if bytes.starts_with(b"PK") || bytes.starts_with(&[0x80]) {
        Ok(Box::new(TorchFile::parse(label, bytes)?))
    } else {
        Ok(Box::new(SafetensorsFile::parse(label, bytes)?))
    }
}
