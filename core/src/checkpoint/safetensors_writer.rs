//! Writing safetensors files tensor by tensor. The whole plan (names, dtypes, shapes) is known up
//! front, so the header and every tensor's place are fixed before any data arrives; the header is
//! the one the `safetensors` crate (and so `safetensors.torch.save_file`) writes for the same
//! tensors: `__metadata__ {"format":"pt"}` first, tensors by descending dtype alignment then by
//! name, padded with spaces to a multiple of 8 bytes.

use std::collections::{HashMap, HashSet};
use std::io::{Seek, SeekFrom, Write};

use ::safetensors::tensor::{Dtype as StDtype, Metadata, TensorInfo as StTensorInfo};

use super::TensorInfo;
use crate::{DType, Error, Result};

fn st_dtype(dtype: DType) -> StDtype {
    match dtype {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::U8 => StDtype::U8,
        DType::I8 => StDtype::I8,
        DType::I32 => StDtype::I32,
        DType::I64 => StDtype::I64,
        DType::F64 => StDtype::F64,
        DType::Bool => StDtype::BOOL,
    }
}

/// One planned tensor: where its bytes go in the file.
struct Slot {
    info: TensorInfo,
    /// Absolute offset in the file.
    offset: u64,
    len: usize,
}

/// The header bytes (length prefix included) for `plan`, and each plan entry's absolute offset
/// and length in the file, in plan order.
fn layout(label: &str, plan: &[TensorInfo]) -> Result<(Vec<u8>, Vec<Slot>)> {
    let mut seen = HashSet::new();
    let mut sizes = Vec::with_capacity(plan.len());
    for t in plan {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::tensor(label, &t.name, "planned twice"));
        }
        let size = t
            .shape
            .iter()
            .try_fold(t.dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::tensor(label, &t.name, "shape overflows the address space"))?;
        sizes.push(size);
    }
    // The file order the safetensors crate uses: descending dtype alignment, then name.
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by(|&l, &r| {
        st_dtype(plan[r].dtype)
            .cmp(&st_dtype(plan[l].dtype))
            .then(plan[l].name.cmp(&plan[r].name))
    });
    let mut relative = vec![0usize; plan.len()];
    let mut entries = Vec::with_capacity(plan.len());
    let mut offset = 0usize;
    for &i in &order {
        relative[i] = offset;
        let end = offset + sizes[i];
        entries.push((
            plan[i].name.clone(),
            StTensorInfo {
                dtype: st_dtype(plan[i].dtype),
                shape: plan[i].shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(format), entries)
        .map_err(|e| Error::format(label, format!("cannot build the safetensors header: {e:?}")))?;
    let json = serde_json::to_string(&metadata)
        .map_err(|e| Error::format(label, format!("cannot serialize the header: {e}")))?;
    let mut header = json.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let data_start = 8 + header.len() as u64;
    let mut bytes = Vec::with_capacity(header.len() + 8);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    let slots = plan
        .iter()
        .zip(relative.iter().zip(&sizes))
        .map(|(info, (&rel, &len))| Slot {
            info: info.clone(),
            offset: data_start + rel as u64,
            len,
        })
        .collect();
    Ok((bytes, slots))
}

/// Writes a safetensors file: the header at creation, then each tensor's bytes in plan order.
/// Only the tensor being written is in memory.
pub struct SafetensorsWriter<W: Write + Seek> {
    sink: W,
    label: String,
    slots: Vec<Slot>,
    next: usize,
}

impl<W: Write + Seek> SafetensorsWriter<W> {
    /// Writes the header for `plan` into `sink`; `label` names the output in errors.
    pub fn new(mut sink: W, label: impl Into<String>, plan: &[TensorInfo]) -> Result<Self> {
        let label = label.into();
        let (header, slots) = layout(&label, plan)?;
        sink.write_all(&header)
            .map_err(|e| Error::io(label.as_str(), e))?;
        Ok(SafetensorsWriter {
            sink,
            label,
            slots,
            next: 0,
        })
    }

    /// The next tensor the writer expects, `None` when all are written.
    pub fn expected(&self) -> Option<&TensorInfo> {
        self.slots.get(self.next).map(|s| &s.info)
    }

    /// Writes the data of `name`, which must be the next tensor of the plan, with exactly the
    /// planned number of bytes (contiguous, little-endian).
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some(slot) = self.slots.get(self.next) else {
            return Err(Error::tensor(
                &self.label,
                name,
                "every planned tensor is already written",
            ));
        };
        if slot.info.name != name {
            return Err(Error::tensor(
                &self.label,
                name,
                format!("written out of plan order: expected `{}`", slot.info.name),
            ));
        }
        if data.len() != slot.len {
            return Err(Error::tensor(
                &self.label,
                name,
                format!(
                    "{} bytes given, but shape {:?} of {} needs {}",
                    data.len(),
                    slot.info.shape,
                    slot.info.dtype,
                    slot.len
                ),
            ));
        }
        let io = |e| Error::io(self.label.as_str(), e);
        self.sink.seek(SeekFrom::Start(slot.offset)).map_err(io)?;
        self.sink.write_all(data).map_err(io)?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every planned tensor was written and hands back the sink, flushed.
    pub fn finish(mut self) -> Result<W> {
        if let Some(slot) = self.slots.get(self.next) {
            return Err(Error::tensor(
                &self.label,
                &slot.info.name,
                format!(
                    "never written ({} of {} tensors were)",
                    self.next,
                    self.slots.len()
                ),
            ));
        }
        self.sink
            .flush()
            .map_err(|e| Error::io(self.label.as_str(), e))?;
        Ok(self.sink)
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl SafetensorsWriter<crate::fsutil::AtomicFile> {
    /// Starts writing `path` through a temporary file beside it; nothing appears at `path`
    /// until [`SafetensorsWriter::commit`].
    pub fn create(path: &std::path::Path, plan: &[TensorInfo]) -> Result<Self> {
        let file = crate::fsutil::AtomicFile::create(path)?;
        Self::new(file, path.display().to_string(), plan)
    }

    /// Finishes the file and renames it into place.
    pub fn commit(self) -> Result<()> {
        self.finish()?.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn info(name: &str, dtype: DType, shape: &[usize]) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn matches_the_safetensors_crate_in_any_plan_order() {
        let plan = [
            info("b.weight", DType::F16, &[2, 3]),
            info("a.ids", DType::I64, &[2]),
            info("a.weight", DType::F32, &[3]),
            info("c.mask", DType::U8, &[5]),
            info("empty", DType::BF16, &[0, 4]),
        ];
        let data: Vec<Vec<u8>> = plan
            .iter()
            .enumerate()
            .map(|(i, t)| {
                (0..t.numel() * t.dtype.size_in_bytes())
                    .map(|b| (b * 7 + i) as u8)
                    .collect()
            })
            .collect();
        let mut w = SafetensorsWriter::new(Cursor::new(Vec::new()), "mem", &plan).unwrap();
        for (t, d) in plan.iter().zip(&data) {
            w.write_tensor(&t.name, d).unwrap();
        }
        let ours = w.finish().unwrap().into_inner();

        let views: Vec<(String, ::safetensors::tensor::TensorView)> = plan
            .iter()
            .zip(&data)
            .map(|(t, d)| {
                let v =
                    ::safetensors::tensor::TensorView::new(st_dtype(t.dtype), t.shape.clone(), d)
                        .unwrap();
                (t.name.clone(), v)
            })
            .collect();
        let format = HashMap::from([("format".to_string(), "pt".to_string())]);
        let theirs = ::safetensors::serialize(views, Some(format)).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn rejects_wrong_order_size_and_missing_tensors() {
        let plan = [info("x", DType::F32, &[2]), info("y", DType::F32, &[1])];
        let mut w =
            SafetensorsWriter::new(Cursor::new(Vec::new()), "out.safetensors", &plan).unwrap();
        let err = w.write_tensor("y", &[0; 4]).unwrap_err().to_string();
        assert!(
            err.contains("out.safetensors") && err.contains("`y`") && err.contains("expected `x`"),
            "{err}"
        );
        let err = w.write_tensor("x", &[0; 4]).unwrap_err().to_string();
        assert!(
            err.contains("4 bytes given") && err.contains("needs 8"),
            "{err}"
        );
        w.write_tensor("x", &[0; 8]).unwrap();
        let err = w.finish().unwrap_err().to_string();
        assert!(
            err.contains("`y`") && err.contains("never written"),
            "{err}"
        );

        let dup = [info("x", DType::F32, &[2]), info("x", DType::F16, &[2])];
        let err = SafetensorsWriter::new(Cursor::new(Vec::new()), "d", &dup)
            .err()
            .unwrap();
        assert!(err.to_string().contains("planned twice"));
    }
}
