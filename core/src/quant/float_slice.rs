//! Borrowed float input of any of the three dtypes bitsandbytes quantizes, and its conversion
//! to f32 a chunk at a time.

use std::borrow::Cow;

use half::{bf16, f16, slice::HalfFloatSliceExt};

use crate::{DType, Error, Result};

/// Input values of one of the dtypes bitsandbytes quantizes (f32, f16, bf16).
#[derive(Debug, Clone, Copy)]
pub enum FloatSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl FloatSlice<'_> {
    pub fn len(&self) -> usize {
        match self {
            FloatSlice::F32(v) => v.len(),
            FloatSlice::F16(v) => v.len(),
            FloatSlice::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            FloatSlice::F32(_) => DType::F32,
            FloatSlice::F16(_) => DType::F16,
            FloatSlice::BF16(_) => DType::BF16,
        }
    }
}

impl<'a> From<&'a [f32]> for FloatSlice<'a> {
    fn from(v: &'a [f32]) -> Self {
        FloatSlice::F32(v)
    }
}
impl<'a> From<&'a [f16]> for FloatSlice<'a> {
    fn from(v: &'a [f16]) -> Self {
        FloatSlice::F16(v)
    }
}
impl<'a> From<&'a [bf16]> for FloatSlice<'a> {
    fn from(v: &'a [bf16]) -> Self {
        FloatSlice::BF16(v)
    }
}

/// Float values decoded from little-endian bytes: borrowed when the bytes are aligned for the
/// element type (on a little-endian target), copied otherwise.
#[derive(Debug, Clone)]
pub enum FloatData<'a> {
    F32(Cow<'a, [f32]>),
    F16(Cow<'a, [f16]>),
    BF16(Cow<'a, [bf16]>),
}

impl<'a> FloatData<'a> {
    /// Reads checkpoint bytes of `dtype` (F32, F16 or BF16). Errors on another dtype or a byte
    /// count that is not a whole number of elements.
    pub fn from_le_bytes(dtype: DType, bytes: &'a [u8]) -> Result<Self> {
        let size = dtype.size_in_bytes();
        if !bytes.chunks_exact(size).remainder().is_empty() {
            return Err(Error::Invalid(format!(
                "{} bytes are not a whole number of {dtype} elements",
                bytes.len()
            )));
        }
        Ok(match dtype {
            DType::F32 => FloatData::F32(cast_or_decode(bytes, |b| {
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            })),
            DType::F16 => {
                FloatData::F16(cast_or_decode(bytes, |b| f16::from_le_bytes([b[0], b[1]])))
            }
            DType::BF16 => {
                FloatData::BF16(cast_or_decode(bytes, |b| bf16::from_le_bytes([b[0], b[1]])))
            }
            other => {
                return Err(Error::Invalid(format!(
                    "4-bit quantization takes float32, float16 or bfloat16 input, not {other}"
                )))
            }
        })
    }

    pub fn as_slice(&self) -> FloatSlice<'_> {
        match self {
            FloatData::F32(v) => FloatSlice::F32(v),
            FloatData::F16(v) => FloatSlice::F16(v),
            FloatData::BF16(v) => FloatSlice::BF16(v),
        }
    }
}

fn cast_or_decode<'a, T: bytemuck::Pod>(bytes: &'a [u8], decode: fn(&[u8]) -> T) -> Cow<'a, [T]> {
    if cfg!(target_endian = "little") {
        if let Ok(v) = bytemuck::try_cast_slice::<u8, T>(bytes) {
            return Cow::Borrowed(v);
        }
    }
    Cow::Owned(
        bytes
            .chunks_exact(std::mem::size_of::<T>())
            .map(decode)
            .collect(),
    )
}

/// An element type the quantizer reads: widened to f32 a chunk at a time (exactly: every f16
/// and bf16 is an f32), so that f16 can use the slice conversion's SIMD path.
pub(crate) trait Element: Copy + Send + Sync {
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl Element for f32 {
    #[inline]
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Element for f16 {
    #[inline]
    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl Element for bf16 {
    #[inline]
    fn widen(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
}

/// Rounds an f32 the way storing it into a tensor of `dtype` does (round to nearest even),
/// and widens it back.
#[inline]
pub(crate) fn round_through(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_bytes_are_borrowed_and_misaligned_ones_copied() {
        let values = [1.5f32, -2.0, 0.25];
        // u32 storage guarantees 4-byte alignment; one byte in it guarantees misalignment.
        let aligned: Vec<u32> = values.iter().map(|v| v.to_bits().to_le()).collect();
        let mut shifted = vec![0u32; 4];
        bytemuck::cast_slice_mut::<u32, u8>(&mut shifted)[1..13]
            .copy_from_slice(bytemuck::cast_slice(&aligned));
        let cases = [
            (bytemuck::cast_slice::<u32, u8>(&aligned), true),
            (&bytemuck::cast_slice::<u32, u8>(&shifted)[1..13], false),
        ];
        for (bytes, borrowed) in cases {
            let data = FloatData::from_le_bytes(DType::F32, bytes).unwrap();
            let FloatData::F32(v) = &data else {
                panic!("dtype")
            };
            assert_eq!(&v[..], &values);
            assert_eq!(matches!(v, Cow::Borrowed(_)), borrowed);
        }
        let bytes = bytemuck::cast_slice::<u32, u8>(&aligned);
        assert!(FloatData::from_le_bytes(DType::BF16, &bytes[..3]).is_err());
        assert!(FloatData::from_le_bytes(DType::I32, bytes).is_err());
    }
}
