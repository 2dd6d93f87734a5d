//! The GGUF header parser (versions 2 and 3, little-endian). Every count and length read from the
//! file is checked against the bytes that remain before anything is allocated for it, so a
//! truncated or lying file gives an error, never a panic or a huge allocation.

use super::{GgmlType, GgufHeader, TensorInfo, Value};
use crate::{Error, Result};
use std::collections::HashSet;

const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays nest; a bound on the depth keeps recursion off the stack limit.
const MAX_ARRAY_DEPTH: u32 = 8;
/// `general.alignment` when the file does not set it.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Smallest encoded size of one value of each GGUF value type, used to reject an array count
/// before it is allocated: a string takes at least its u64 length, an array its type and count.
fn min_encoded_size(value_type: u32) -> Option<u64> {
    Some(match value_type {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

struct Cursor<'a> {
    file: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(self.file, format!("GGUF at byte {}: {msg}", self.pos))
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{what} needs {n} bytes but only {} remain (truncated or corrupt file)",
                self.remaining()
            )));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let slice = self.take(N as u64, what)?;
        Ok(slice.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            Error::format(
                self.file,
                format!("GGUF at byte {start}: {what} is not valid UTF-8 ({e})"),
            )
        })
    }

    /// Checks that `count` items of at least `min_size` bytes each can still be in the file.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<usize> {
        match count.checked_mul(min_size) {
            Some(total) if total <= self.remaining() => Ok(count as usize),
            _ => Err(self.err(format!(
                "{what} count {count} cannot fit in the {} remaining bytes",
                self.remaining()
            ))),
        }
    }

    fn value(&mut self, value_type: u32, key: &str, depth: u32) -> Result<Value> {
        Ok(match value_type {
            0 => Value::U8(u8::from_le_bytes(self.array(key)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(key)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("`{key}`: bool byte is {b}, not 0 or 1"))),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "`{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let item_type = self.u32(key)?;
                let min_size = min_encoded_size(item_type).ok_or_else(|| {
                    self.err(format!("`{key}`: unknown array item type {item_type}"))
                })?;
                let count = self.u64(key)?;
                let count = self.check_count(count, min_size, &format!("`{key}` array"))?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(key)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.err(format!("`{key}`: unknown value type {t}"))),
        })
    }

    fn tensor_info(&mut self) -> Result<(String, GgmlType, Vec<u64>, u64)> {
        let name = self.string("tensor name")?;
        let n_dims = self.u32("tensor dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(self.err(format!(
                "tensor `{name}` has {n_dims} dimensions, more than ggml's {MAX_DIMS}"
            )));
        }
        let dims = (0..n_dims)
            .map(|_| self.u64("tensor dimension"))
            .collect::<Result<Vec<u64>>>()?;
        let type_id = self.u32("tensor type")?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| self.err(format!("tensor `{name}` has unknown ggml type {type_id}")))?;
        let offset = self.u64("tensor offset")?;
        Ok((name, ggml_type, dims, offset))
    }
}

/// Parses the header of a GGUF file (`bytes` is the whole file; `file` names it in errors):
/// metadata, tensor infos, alignment, and checks that every tensor's data lies inside `bytes`.
pub fn parse_header(file: &str, bytes: &[u8]) -> Result<GgufHeader> {
    let mut cur = Cursor {
        file,
        bytes,
        pos: 0,
    };
    if cur.array::<4>("magic")? != *MAGIC {
        return Err(Error::format(file, "not a GGUF file (no `GGUF` magic)"));
    }
    let version = cur.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(Error::format(
                file,
                "GGUF version 1 is not supported (only 2 and 3)",
            ))
        }
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(Error::format(
                file,
                "big-endian GGUF files are not supported",
            ))
        }
        v => {
            return Err(Error::format(
                file,
                format!("GGUF version {v} is not supported (only 2 and 3)"),
            ))
        }
    }
    let tensor_count = cur.u64("tensor count")?;
    let kv_count = cur.u64("metadata count")?;
    // A key-value pair takes at least a key length, a value type and one byte of value.
    let kv_count = cur.check_count(kv_count, 13, "metadata")?;

    let mut metadata = Vec::with_capacity(kv_count);
    let mut keys = HashSet::with_capacity(kv_count);
    for _ in 0..kv_count {
        let key = cur.string("metadata key")?;
        let value_type = cur.u32("metadata value type")?;
        let value = cur.value(value_type, &key, 0)?;
        if !keys.insert(key.clone()) {
            return Err(cur.err(format!("duplicate metadata key `{key}`")));
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(Error::format(
                file,
                format!("`general.alignment` must be a UINT32 power of two, got {v:?}"),
            ))
        }
    };

    // A tensor info takes at least a name length, a dimension count, a type and an offset.
    let tensor_count = cur.check_count(tensor_count, 24, "tensor info")?;
    let mut raw_infos = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        raw_infos.push(cur.tensor_info()?);
    }
    let data_offset = (cur.pos as u64).next_multiple_of(alignment);
    let file_len = bytes.len() as u64;

    let mut names = HashSet::with_capacity(tensor_count);
    let mut tensors = Vec::with_capacity(tensor_count);
    for (name, ggml_type, dims, offset) in raw_infos {
        let bad = |msg: String| Error::tensor(file, &name, msg);
        if !names.insert(name.clone()) {
            return Err(bad("appears twice in the tensor infos".into()));
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("element count of dims {dims:?} overflows")))?;
        let n_bytes = ggml_type.byte_size(n_elements).ok_or_else(|| {
            bad(format!(
                "{n_elements} elements is not a whole number of {ggml_type} blocks of {}",
                ggml_type.block_size
            ))
        })?;
        if !offset.is_multiple_of(alignment) {
            return Err(bad(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let start = data_offset.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => tensors.push(TensorInfo {
                name,
                ggml_type,
                dims,
                data: start as usize..end as usize,
            }),
            _ => {
                return Err(bad(format!(
                    "data ({n_bytes} bytes at offset {offset} after the header end {data_offset}) \
                     lies past the end of the {file_len}-byte file"
                )))
            }
        }
    }

    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}
