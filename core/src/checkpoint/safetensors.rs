//! Reading safetensors files: an 8-byte little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {..}}`, then the data.
//! The header is parsed and checked here (rather than by the `safetensors` crate) so that every
//! error can name the file and the tensor; data is sliced out one tensor at a time.

use std::collections::BTreeMap;

use super::bytes::FileBytes;
use super::{RawTensor, TensorInfo, TensorSource};
use crate::{DType, Error, Result};

/// The header length the `safetensors` crate accepts at most.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Every dtype qlora knows, to look one up by its safetensors name.
const KNOWN_DTYPES: [DType; 9] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::U8,
    DType::I8,
    DType::I32,
    DType::I64,
    DType::F64,
    DType::Bool,
];

/// `F32`, `BF16`, `BOOL`, ... → the dtype; `None` for names qlora does not handle (`F8_E4M3`, ...).
pub fn dtype_from_safetensors_name(name: &str) -> Option<DType> {
    KNOWN_DTYPES
        .into_iter()
        .find(|d| d.safetensors_name() == name)
}

/// Where one tensor lies in the file: an absolute byte range.
#[derive(Debug, Clone)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The header entry of one tensor, as written.
#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// One safetensors file, its header parsed and checked against the file length.
pub struct SafetensorsFile {
    label: String,
    bytes: FileBytes,
    tensors: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Parses a file held in memory; `label` names it in errors (the browser's file name).
    pub fn from_bytes(label: impl Into<String>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(label.into(), FileBytes::Owned(bytes))
    }

    /// Maps and parses the file at `path`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path) -> Result<Self> {
        Self::parse(path.display().to_string(), FileBytes::map(path)?)
    }

    /// The `__metadata__` map of the header (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The stored bytes of one tensor, without copying.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let entry = self.entry(name)?;
        Ok(&self.bytes[entry.start..entry.end])
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::tensor(&self.label, name, "no such tensor in this file"))
    }

    pub(super) fn parse(label: String, bytes: FileBytes) -> Result<Self> {
        let file_len = bytes.len() as u64;
        let Some(len_bytes) = bytes.get(..8) else {
            return Err(Error::format(
                &label,
                format!("truncated safetensors file: {file_len} bytes, not even the 8-byte header length"),
            ));
        };
        let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        if header_len > file_len - 8 {
            return Err(Error::format(
                &label,
                format!(
                    "safetensors header length {header_len} exceeds the file ({file_len} bytes)"
                ),
            ));
        }
        if header_len > MAX_HEADER_LEN {
            return Err(Error::format(
                &label,
                format!("safetensors header length {header_len} is over the {MAX_HEADER_LEN}-byte limit"),
            ));
        }
        let data_start = 8 + header_len as usize;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..data_start]).map_err(|e| {
                Error::format(
                    &label,
                    format!("safetensors header is not a JSON object: {e}"),
                )
            })?;
        let data_len = bytes.len() - data_start;

        let mut metadata = BTreeMap::new();
        let mut tensors = BTreeMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                metadata = serde_json::from_value(value).map_err(|e| {
                    Error::format(
                        &label,
                        format!("`__metadata__` is not a map of strings: {e}"),
                    )
                })?;
                continue;
            }
            let entry =
                parse_entry(value, data_len).map_err(|msg| Error::tensor(&label, &name, msg))?;
            tensors.insert(
                name,
                Entry {
                    start: data_start + entry.start,
                    end: data_start + entry.end,
                    ..entry
                },
            );
        }
        check_no_overlap(&label, &tensors)?;
        Ok(SafetensorsFile {
            label,
            bytes,
            tensors,
            metadata,
        })
    }
}

/// Checks one header entry against itself and the data section; offsets stay relative.
fn parse_entry(value: serde_json::Value, data_len: usize) -> Result<Entry, String> {
    let raw: HeaderEntry =
        serde_json::from_value(value).map_err(|e| format!("bad header entry: {e}"))?;
    let dtype = dtype_from_safetensors_name(&raw.dtype)
        .ok_or_else(|| format!("unknown or unsupported dtype `{}`", raw.dtype))?;
    let [start, end] = raw.data_offsets;
    if start > end || end > data_len as u64 {
        return Err(format!(
            "data_offsets [{start}, {end}] do not fit the data section ({data_len} bytes)"
        ));
    }
    let needed = raw
        .shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d));
    if needed != Some((end - start) as usize) {
        return Err(format!(
            "shape {:?} of {} needs {} bytes but data_offsets [{start}, {end}] cover {}",
            raw.shape,
            raw.dtype,
            needed.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
            end - start
        ));
    }
    Ok(Entry {
        dtype,
        shape: raw.shape,
        start: start as usize,
        end: end as usize,
    })
}

/// Two tensors whose byte ranges overlap would alias each other's data: a lying header.
fn check_no_overlap(label: &str, tensors: &BTreeMap<String, Entry>) -> Result<()> {
    let mut by_start: Vec<(&String, &Entry)> =
        tensors.iter().filter(|(_, e)| e.end > e.start).collect();
    by_start.sort_by_key(|(_, e)| e.start);
    for pair in by_start.windows(2) {
        let ((first, a), (second, b)) = (pair[0], pair[1]);
        if b.start < a.end {
            return Err(Error::tensor(
                label,
                second.as_str(),
                format!("data_offsets overlap those of tensor `{first}`"),
            ));
        }
    }
    Ok(())
}

impl TensorSource for SafetensorsFile {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.tensors
            .iter()
            .map(|(name, e)| TensorInfo {
                name: name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
            })
            .collect()
    }

    fn read(&self, name: &str) -> Result<RawTensor> {
        let entry = self.entry(name)?;
        Ok(RawTensor {
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            data: self.bytes[entry.start..entry.end].to_vec(),
        })
    }

    fn file_of(&self, name: &str) -> Option<String> {
        self.tensors.contains_key(name).then(|| self.label.clone())
    }
}
