//! The bytes of one checkpoint file: owned (what the browser hands over) or memory-mapped (native),
//! so that a reader slices one tensor out without loading the rest of the file.

use std::ops::Deref;

/// The whole content of a checkpoint file, addressed as one byte slice.
pub enum FileBytes {
    Owned(Vec<u8>),
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Owned(v) => v,
            #[cfg(not(target_arch = "wasm32"))]
            FileBytes::Mapped(m) => m,
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl FileBytes {
    /// Maps `path` read-only. The file must not be truncated while mapped (checkpoints are inputs
    /// that nothing rewrites while qlora runs).
    pub fn map(path: &std::path::Path) -> crate::Result<FileBytes> {
        let file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
        let len = file
            .metadata()
            .map_err(|e| crate::Error::io(path, e))?
            .len();
        if len == 0 {
            // Mapping an empty file fails on some systems; an empty buffer says the same thing.
            return Ok(FileBytes::Owned(Vec::new()));
        }
        // SAFETY: the mapping is read-only and the file is not modified while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| crate::Error::io(path, e))?;
        Ok(FileBytes::Mapped(map))
    }
}
