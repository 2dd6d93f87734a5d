//! A safetensors file whose tensors are known only as they are computed.
//!
//! A safetensors header lists every tensor's size before any data, but some sizes are known only
//! after the work that produces them (a bitsandbytes `quant_state` JSON holds the double-quant
//! offset's decimal digits). So tensors are appended to a scratch file as they come, one at a
//! time, and [`Spill::finish`] writes the real file from it, tensor by tensor: memory stays
//! bounded by the largest tensor, and the scratch file is deleted whatever happens.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::bytes::FileBytes;
use super::{RawTensor, SafetensorsWriter, TensorInfo};
use crate::{Error, Result};

pub struct Spill {
    scratch: tempfile::NamedTempFile,
    out: BufWriter<File>,
    /// Each tensor and where its bytes start in the scratch file.
    entries: Vec<(TensorInfo, u64, usize)>,
    len: u64,
}

impl Spill {
    /// Starts a spill whose scratch file lives in `dir` (the output's directory, so the space
    /// used is on the same disk and visible).
    pub fn new(dir: &Path) -> Result<Spill> {
        let scratch = tempfile::Builder::new()
            .prefix(".spill-")
            .tempfile_in(dir)
            .map_err(|e| Error::io(dir, e))?;
        let out = BufWriter::new(scratch.reopen().map_err(|e| Error::io(scratch.path(), e))?);
        Ok(Spill {
            scratch,
            out,
            entries: Vec::new(),
            len: 0,
        })
    }

    /// Appends one tensor. Names must be unique (the final writer checks).
    pub fn push(&mut self, name: String, tensor: &RawTensor) -> Result<()> {
        self.out
            .write_all(&tensor.data)
            .map_err(|e| Error::io(self.scratch.path(), e))?;
        self.entries.push((
            TensorInfo {
                name,
                dtype: tensor.dtype,
                shape: tensor.shape.clone(),
            },
            self.len,
            tensor.data.len(),
        ));
        self.len += tensor.data.len() as u64;
        Ok(())
    }

    /// Total bytes of tensor data so far.
    pub fn data_len(&self) -> u64 {
        self.len
    }

    /// Writes the safetensors file at `path` (atomically) from the scratch file.
    pub fn finish(mut self, path: &Path) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::io(self.scratch.path(), e))?;
        let plan: Vec<TensorInfo> = self.entries.iter().map(|(i, _, _)| i.clone()).collect();
        let scratch = FileBytes::map(self.scratch.path())?;
        let mut writer = SafetensorsWriter::create(path, &plan)?;
        for (info, offset, len) in &self.entries {
            let start = *offset as usize;
            writer.write_tensor(&info.name, &scratch[start..start + len])?;
        }
        writer.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{SafetensorsFile, TensorSource};
    use crate::DType;

    #[test]
    fn spilled_tensors_come_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(dir.path()).unwrap();
        let a = RawTensor {
            dtype: DType::U8,
            shape: vec![3],
            data: vec![1, 2, 3],
        };
        let b = RawTensor {
            dtype: DType::F32,
            shape: vec![2],
            data: [1.5f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        };
        spill.push("z.small".into(), &a).unwrap();
        spill.push("a.float".into(), &b).unwrap();
        assert_eq!(spill.data_len(), 11);
        let path = dir.path().join("out.safetensors");
        spill.finish(&path).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.read("z.small").unwrap(), a);
        assert_eq!(file.read("a.float").unwrap(), b);
        // Only the output is left: the scratch file is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
