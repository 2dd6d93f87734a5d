//! Element types of checkpoint tensors, and their conversion to f32.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// The element types qlora reads and writes. Names follow safetensors (`F32`, `BF16`, `U8`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DType {
    F32,
    F16,
    BF16,
    U8,
    I8,
    I32,
    I64,
    F64,
    Bool,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::U8 | DType::I8 | DType::Bool => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// The name safetensors uses in its header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::F64 => "F64",
            DType::Bool => "BOOL",
        }
    }

    /// The name torch and transformers use (`float32`, `bfloat16`, ...).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F64 => "float64",
            DType::Bool => "bool",
        }
    }

    /// Parses `float32`/`fp32`/`f32`, `bfloat16`/`bf16`, `float16`/`fp16`/`f16` (any case,
    /// with or without a `torch.` prefix).
    pub fn parse_float(name: &str) -> Option<DType> {
        let n = name.trim().to_ascii_lowercase();
        match n.strip_prefix("torch.").unwrap_or(&n) {
            "float32" | "fp32" | "f32" | "float" => Some(DType::F32),
            "float16" | "fp16" | "f16" | "half" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            _ => None,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// Converts little-endian float bytes of `dtype` to f32. `bytes.len()` must be a multiple of
/// the element size; the caller checks shapes.
pub fn to_f32(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    let n = bytes.len() / dtype.size_in_bytes();
    let mut out = Vec::with_capacity(n);
    match dtype {
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        DType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        DType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        DType::F64 => {
            out.extend(bytes.chunks_exact(8).map(|b| {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }))
        }
        _ => return None,
    }
    Some(out)
}

/// Converts f32 values to little-endian bytes of the float `dtype` (round to nearest even for
/// f16/bf16, as torch's casts do).
///
/// # Panics
/// If `dtype` is not F32, F16 or BF16: callers pick the dtype from a float tensor.
pub fn from_f32(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size_in_bytes());
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        other => panic!("from_f32: {other} is not a float type"),
    }
    out
}
