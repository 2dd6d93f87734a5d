//! PyTorch checkpoints as torch.save writes them since 1.6: a zip archive holding
//! `<archive>/data.pkl` (the pickled state dict, whose tensors point at storages by key) and one
//! uncompressed entry `<archive>/data/<key>` per storage. The pickle is read at open time to learn
//! every tensor's dtype, shape, stride and storage; a tensor's bytes are sliced from its storage
//! entry only when it is read, so a 14 GB shard is never loaded whole.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use super::bytes::FileBytes;
use super::pickle::{unpickle, TensorRef, Value};
use super::zip_index::{read_index, ZipEntry, STORED};
use super::{RawTensor, TensorInfo, TensorSource};
use crate::{DType, Error, Result};

/// The opcode every pickle of protocol 2 or later begins with. torch.save's legacy (pre-1.6)
/// format is a bare pickle stream; the current one is a zip archive (`PK`).
const PICKLE_PROTO: u8 = 0x80;

/// The element type of a torch storage class (`torch.FloatStorage`, ...).
fn storage_dtype(type_name: &str) -> Option<DType> {
    Some(match type_name {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

/// What the pickle says of one tensor: a strided view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchTensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// In elements, one per dimension.
    pub stride: Vec<usize>,
    /// The storage entry is `<archive>/data/<storage_key>`; tensors may share one.
    pub storage_key: String,
    /// In elements from the start of the storage.
    pub storage_offset: usize,
}

struct TorchTensor {
    info: TorchTensorInfo,
    /// The storage's bytes in the file (exactly its declared element count).
    storage: Range<usize>,
}

/// One torch.save (zip) checkpoint file.
pub struct TorchFile {
    label: String,
    bytes: FileBytes,
    tensors: BTreeMap<String, TorchTensor>,
}

impl TorchFile {
    /// Parses a file held in memory; `label` names it in errors.
    pub fn from_bytes(label: impl Into<String>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(label.into(), FileBytes::Owned(bytes))
    }

    /// Maps and parses the file at `path`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path) -> Result<Self> {
        Self::parse(path.display().to_string(), FileBytes::map(path)?)
    }

    /// The storage view behind `name`, as pickled.
    pub fn torch_info(&self, name: &str) -> Option<&TorchTensorInfo> {
        self.tensors.get(name).map(|t| &t.info)
    }

    pub(super) fn parse(label: String, bytes: FileBytes) -> Result<Self> {
        if bytes.first() == Some(&PICKLE_PROTO) {
            return Err(Error::format(
                &label,
                "legacy (pre-1.6, non-zip) torch.save format, which qlora does not read; re-save it \
                 with a current torch: torch.save(torch.load(path), path)",
            ));
        }
        let index = read_index(&bytes).map_err(|m| Error::format(&label, m))?;
        let (prefix, pickle_entry) = find_pickle(&index).ok_or_else(|| {
            Error::format(
                &label,
                "no `<archive>/data.pkl` entry: not a torch.save checkpoint",
            )
        })?;
        let entry_bytes = |name: &str, entry: &ZipEntry| -> Result<&[u8], String> {
            if entry.method != STORED {
                return Err(format!(
                    "zip entry `{name}` is compressed (method {}); torch.save stores entries \
                     uncompressed, re-save the checkpoint with torch.save",
                    entry.method
                ));
            }
            Ok(&bytes[entry.data.clone()])
        };
        let byteorder_name = format!("{prefix}byteorder");
        if let Some(entry) = index.get(&byteorder_name) {
            let order =
                entry_bytes(&byteorder_name, entry).map_err(|m| Error::format(&label, m))?;
            if order != b"little" {
                return Err(Error::format(
                    &label,
                    format!(
                        "byte order `{}` is not supported (only little-endian)",
                        String::from_utf8_lossy(order)
                    ),
                ));
            }
        }
        let pickle_name = format!("{prefix}data.pkl");
        let pickle =
            entry_bytes(&pickle_name, pickle_entry).map_err(|m| Error::format(&label, m))?;
        let state =
            unpickle(pickle).map_err(|m| Error::format(&label, format!("{pickle_name}: {m}")))?;
        let Value::Dict(items) = state else {
            return Err(Error::format(
                &label,
                format!("{pickle_name} holds no dict of tensors"),
            ));
        };

        let mut tensors = BTreeMap::new();
        for (key, value) in items {
            let Some(name) = key.as_str() else {
                return Err(Error::format(
                    &label,
                    format!("{pickle_name}: a key is not a string: {key:?}"),
                ));
            };
            let Value::Tensor(view) = value else {
                return Err(Error::tensor(&label, name, "the value is not a tensor"));
            };
            let storage_name = format!("{prefix}data/{}", view.storage.key);
            let storage_entry = index.get(&storage_name).ok_or_else(|| {
                Error::tensor(
                    &label,
                    name,
                    format!("storage entry `{storage_name}` is missing from the archive"),
                )
            })?;
            entry_bytes(&storage_name, storage_entry)
                .map_err(|m| Error::tensor(&label, name, m))?;
            let tensor = resolve(&view, storage_entry.data.clone())
                .map_err(|m| Error::tensor(&label, name, m))?;
            tensors.insert(name.to_string(), tensor);
        }
        Ok(TorchFile {
            label,
            bytes,
            tensors,
        })
    }
}

/// The `data.pkl` entry at the archive's top level and the `<archive>/` prefix of its records.
fn find_pickle(index: &HashMap<String, ZipEntry>) -> Option<(String, &ZipEntry)> {
    index.iter().find_map(|(name, entry)| {
        let prefix = name.strip_suffix("data.pkl")?;
        let top_level = prefix.is_empty() || prefix.find('/') == Some(prefix.len() - 1);
        top_level.then(|| (prefix.to_string(), entry))
    })
}

/// Checks a pickled view against its storage entry: a known dtype, a storage as long as it says,
/// and a view that stays inside the storage.
fn resolve(view: &TensorRef, entry: Range<usize>) -> Result<TorchTensor, String> {
    let storage = &view.storage;
    let dtype = storage_dtype(&storage.type_name)
        .ok_or_else(|| format!("unknown storage type torch.{}", storage.type_name))?;
    let too_big = || format!("sizes of {view:?} overflow the address space");
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| too_big());
    let numel = to_usize(storage.numel)?;
    let storage_len = numel
        .checked_mul(dtype.size_in_bytes())
        .ok_or_else(too_big)?;
    if storage_len > entry.len() {
        return Err(format!(
            "storage `{}` of {numel} {dtype} elements needs {storage_len} bytes but its entry holds {}",
            storage.key,
            entry.len()
        ));
    }
    let shape = view
        .shape
        .iter()
        .map(|&d| to_usize(d))
        .collect::<Result<Vec<_>, _>>()?;
    let stride = view
        .stride
        .iter()
        .map(|&d| to_usize(d))
        .collect::<Result<Vec<_>, _>>()?;
    let offset = to_usize(view.offset)?;
    let view_numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(too_big)?;
    // Only zero or overlapping strides (a broadcast view) can need more elements than the
    // storage has; refusing them keeps the copy made on read no larger than the file.
    if view_numel > numel {
        return Err(format!(
            "view of shape {shape:?} with stride {stride:?} repeats elements of storage `{}` \
             ({numel} elements); re-save the tensor after .contiguous()",
            storage.key
        ));
    }
    if view_numel > 0 {
        let last = shape
            .iter()
            .zip(&stride)
            .try_fold(offset, |acc, (&d, &s)| {
                (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
            })
            .ok_or_else(too_big)?;
        if last >= numel {
            return Err(format!(
                "view (offset {offset}, shape {shape:?}, stride {stride:?}) reaches element {last} \
                 of storage `{}`, which has {numel}",
                storage.key
            ));
        }
    }
    Ok(TorchTensor {
        info: TorchTensorInfo {
            dtype,
            shape,
            stride,
            storage_key: storage.key.clone(),
            storage_offset: offset,
        },
        storage: entry.start..entry.start + storage_len,
    })
}

/// True when a row-major walk of `shape` visits consecutive elements.
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
}

/// Copies the view's elements out of `storage` into a contiguous row-major buffer. The view was
/// checked to lie inside the storage.
fn gather(storage: &[u8], info: &TorchTensorInfo) -> Vec<u8> {
    let elem = info.dtype.size_in_bytes();
    let numel: usize = info.shape.iter().product();
    if numel == 0 {
        return Vec::new();
    }
    if is_contiguous(&info.shape, &info.stride) {
        return storage[info.storage_offset * elem..(info.storage_offset + numel) * elem].to_vec();
    }
    let mut out = Vec::with_capacity(numel * elem);
    let mut index = vec![0usize; info.shape.len()];
    for _ in 0..numel {
        let at = info.storage_offset
            + index
                .iter()
                .zip(&info.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        out.extend_from_slice(&storage[at * elem..(at + 1) * elem]);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < info.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

impl TensorSource for TorchFile {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.tensors
            .iter()
            .map(|(name, t)| TensorInfo {
                name: name.clone(),
                dtype: t.info.dtype,
                shape: t.info.shape.clone(),
            })
            .collect()
    }

    fn read(&self, name: &str) -> Result<RawTensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(&self.label, name, "no such tensor in this file"))?;
        Ok(RawTensor {
            dtype: t.info.dtype,
            shape: t.info.shape.clone(),
            data: gather(&self.bytes[t.storage.clone()], &t.info),
        })
    }

    fn file_of(&self, name: &str) -> Option<String> {
        self.tensors.contains_key(name).then(|| self.label.clone())
    }
}
