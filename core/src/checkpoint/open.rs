//! Opening a checkpoint from a path, whatever its format.

use std::path::Path;

use super::bytes::FileBytes;
use super::files::{parse_file, FileKind, CHECKPOINT_FILES};
use super::sharded::ShardedCheckpoint;
use super::BoxedSource;
use crate::{Error, Result};

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
    match FileKind::of(&name) {
        FileKind::ShardIndex => Ok(Box::new(ShardedCheckpoint::open(path)?)),
        kind => parse_file(kind, path.display().to_string(), FileBytes::map(path)?),
    }
}
