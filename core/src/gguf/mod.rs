//! GGUF files (llama.cpp's model format, versions 2 and 3): metadata, tensor infos, and each
//! tensor's data as a byte range of the file. Works on bytes in memory (wasm) and, natively, on a
//! memory-mapped file.

mod dequant;
mod ggml_type;
mod model;
mod parse;
mod value;

pub use dequant::dequantize;
pub use ggml_type::GgmlType;
pub use model::GgufCheckpoint;
pub use parse::{parse_header, DEFAULT_ALIGNMENT};
pub use value::Value;

use crate::{Error, Result};
use std::ops::Range;

/// One tensor of a GGUF file, known from its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub ggml_type: GgmlType,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one, so a PyTorch-style
    /// row-major shape is `dims` reversed (`token_embd.weight` of SmolLM2 is `[576, 49152]`).
    pub dims: Vec<u64>,
    /// Where the tensor's bytes are in the whole file (already checked to lie inside it).
    pub data: Range<usize>,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The row-major (PyTorch) shape: `dims` reversed.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// Everything in a GGUF file before the tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    /// 2 or 3.
    pub version: u32,
    /// The key-value pairs, in file order (keys are unique).
    pub metadata: Vec<(String, Value)>,
    /// The tensor infos, in file order (names are unique).
    pub tensors: Vec<TensorInfo>,
    /// `general.alignment`, or 32.
    pub alignment: u64,
    /// Where the tensor data section starts in the file.
    pub data_offset: u64,
}

/// The bytes of a GGUF file: owned (read into memory, or handed over by a browser) or mapped.
enum Storage {
    Owned(Vec<u8>),
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Owned(v) => v,
            #[cfg(not(target_arch = "wasm32"))]
            Storage::Mapped(m) => m,
        }
    }
}

/// An opened GGUF file: its parsed header and its bytes.
pub struct Gguf {
    name: String,
    header: GgufHeader,
    bytes: Storage,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("name", &self.name)
            .field("version", &self.header.version)
            .field("metadata_len", &self.header.metadata.len())
            .field("tensors_len", &self.header.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Parses a GGUF file held in memory; `name` is used in error messages.
    pub fn from_bytes(name: impl Into<String>, bytes: Vec<u8>) -> Result<Gguf> {
        Gguf::new(name.into(), Storage::Owned(bytes))
    }

    /// Memory-maps and parses a GGUF file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Gguf> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; as with every mmap-based model loader, the file must not
        // be truncated by another process while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Gguf::new(path.display().to_string(), Storage::Mapped(map))
    }

    fn new(name: String, bytes: Storage) -> Result<Gguf> {
        let header = parse_header(&name, &bytes)?;
        Ok(Gguf {
            name,
            header,
            bytes,
        })
    }

    /// The name given at opening (the path for files), as errors show it.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.header.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.header
            .metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    fn wrong_type(&self, key: &str, want: &str, got: &Value) -> Error {
        Error::format(
            &self.name,
            format!(
                "metadata `{key}` should be {want}, but is {}",
                got.type_name()
            ),
        )
    }

    /// A required key, read with one of the typed getters (`gguf.require("llama.block_count",
    /// Gguf::get_u32)`); a missing key is an error naming the file and the key.
    pub fn require<'a, T>(
        &'a self,
        key: &str,
        get: impl FnOnce(&'a Gguf, &str) -> Result<Option<T>>,
    ) -> Result<T> {
        get(self, key)?
            .ok_or_else(|| Error::format(&self.name, format!("metadata `{key}` is missing")))
    }

    /// A string value, `None` if the key is absent, an error if it has another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "a string", v))
            })
            .transpose()
    }

    /// A bool value, `None` if the key is absent, an error if it has another type.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v)))
            .transpose()
    }

    /// An integer value of any GGUF integer type that fits in u32 (token ids, sizes).
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get(key)
            .map(|v| {
                v.as_int()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| self.wrong_type(key, "an integer in u32 range", v))
            })
            .transpose()
    }

    /// An integer value of any GGUF integer type that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_int()
                    .and_then(|i| u64::try_from(i).ok())
                    .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    /// A float value (FLOAT32 or FLOAT64).
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_float()
                    .ok_or_else(|| self.wrong_type(key, "a float", v))
            })
            .transpose()
    }

    /// An array of strings (a tokenizer's tokens or merges).
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .and_then(|items| items.iter().map(Value::as_str).collect())
                    .ok_or_else(|| self.wrong_type(key, "an array of strings", v))
            })
            .transpose()
    }

    /// An array of integers that fit in i32 (a tokenizer's token types).
    pub fn get_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .and_then(|items| {
                        items
                            .iter()
                            .map(|i| i.as_int().and_then(|i| i32::try_from(i).ok()))
                            .collect()
                    })
                    .ok_or_else(|| self.wrong_type(key, "an array of integers", v))
            })
            .transpose()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of one tensor (ggml layout of its type); the error names file and tensor.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let info = self
            .tensor(name)
            .ok_or_else(|| Error::tensor(&self.name, name, "no such tensor in the file"))?;
        Ok(&self.bytes[info.data.clone()])
    }

    /// One tensor's values as f32 (F32, F16, Q4_1 and Q8_0 tensors), in ggml order (`dims[0]`
    /// fastest), bit-identical to gguf-py's `dequantize`.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self
            .tensor(name)
            .ok_or_else(|| Error::tensor(&self.name, name, "no such tensor in the file"))?;
        let n_elements = usize::try_from(info.n_elements())
            .map_err(|_| Error::tensor(&self.name, name, "too many elements for this platform"))?;
        dequantize(info.ggml_type, &self.bytes[info.data.clone()], n_elements)
            .map_err(|e| Error::tensor(&self.name, name, e.to_string()))
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
pub(crate) mod test_writer;
#[cfg(test)]
mod tests;
