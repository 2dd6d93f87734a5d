//! NF4 and FP4 blockwise 4-bit quantization, bit for bit as bitsandbytes' CUDA kernels compute
//! it (`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`), with optional double
//! quantization of the per-block absmax (`compress_statistics=True`).
//!
//! Layout (as bitsandbytes stores it): the tensor is flattened row-major and cut into blocks
//! of `blocksize` elements (the last may be shorter); each block keeps its absmax (f32) and
//! one 4-bit code per element, two codes per byte with the even element in the high nibble.

mod blockwise;
mod codebook;
mod double_quant;
mod dynamic_map;
mod fast_math;
mod float_slice;
mod torch_mean;

use std::str::FromStr;

use half::{bf16, f16};

pub use codebook::{codebook, decode_table};
pub use double_quant::{DoubleQuant, NESTED_BLOCKSIZE};
pub use dynamic_map::dynamic_map_signed;
pub use float_slice::{FloatData, FloatSlice};

use crate::{DType, Error, Result};

/// The block sizes bitsandbytes' 4-bit kernels accept.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4: quantiles of a normal distribution (QLoRA's choice).
    Nf4,
    /// e2m1 float with bitsandbytes' own subnormal (its default).
    Fp4,
}

impl QuantType {
    /// The name bitsandbytes and transformers use (`bnb_4bit_quant_type`).
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }
}

impl FromStr for QuantType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::Invalid(format!(
                "unknown 4-bit quantization type `{other}` (expected nf4 or fp4)"
            ))),
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The per-block absmax: plain f32, or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double(DoubleQuant),
}

impl Absmax {
    /// Number of 4-bit blocks it describes.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double(d) => d.quantized.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The absmax of every block as dequantization uses it (expanded when double-quantized).
    /// Errors when a double-quantized absmax has the wrong number of nested values.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self {
            Absmax::Plain(v) => Ok(v.clone()),
            Absmax::Double(d) => d.expand(),
        }
    }
}

/// A 4-bit quantized tensor with everything needed to dequantize it.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4 {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// The original shape (row-major).
    pub shape: Vec<usize>,
    /// The original element type (F32, F16 or BF16): dequantized values are rounded to it.
    pub dtype: DType,
    /// `(numel + 1) / 2` bytes.
    pub packed: Vec<u8>,
    /// One per block: `numel.div_ceil(blocksize)`.
    pub absmax: Absmax,
}

impl Quantized4 {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Checks that the fields agree (block size, dtype, lengths), so that dequantization of a
    /// tensor read from a file cannot index out of bounds.
    pub fn validate(&self) -> Result<()> {
        check_blocksize(self.blocksize)?;
        check_dtype(self.dtype)?;
        let numel = checked_numel(&self.shape)?;
        if self.packed.len() != numel.div_ceil(2) {
            return Err(Error::Invalid(format!(
                "{numel} 4-bit values of shape {:?} need {} packed bytes, not {}",
                self.shape,
                numel.div_ceil(2),
                self.packed.len()
            )));
        }
        let blocks = numel.div_ceil(self.blocksize);
        if self.absmax.len() != blocks {
            return Err(Error::Invalid(format!(
                "{numel} values in blocks of {} need {blocks} absmax values, not {}",
                self.blocksize,
                self.absmax.len()
            )));
        }
        Ok(())
    }
}

fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "4-bit block size {blocksize} is not one of {BLOCKSIZES:?}"
        )))
    }
}

fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::Invalid(format!(
            "4-bit quantization is of float32, float16 or bfloat16 tensors, not {other}"
        ))),
    }
}

fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::Invalid(format!("shape {shape:?} overflows")))
}

/// `bitsandbytes.functional.quantize_4bit(x, blocksize, compress_statistics=double_quant,
/// quant_type)` of a CUDA tensor: same packed bytes, absmax (or double-quantized absmax and
/// offset) to the bit. `input` is row-major with `shape`.
pub fn quantize_4bit(
    input: FloatSlice<'_>,
    shape: &[usize],
    quant_type: QuantType,
    blocksize: usize,
    double_quant: bool,
) -> Result<Quantized4> {
    check_blocksize(blocksize)?;
    let numel = checked_numel(shape)?;
    if numel != input.len() {
        return Err(Error::Invalid(format!(
            "shape {shape:?} has {numel} elements but the input has {}",
            input.len()
        )));
    }
    if numel == 0 {
        return Err(Error::Invalid(format!(
            "cannot quantize an empty tensor (shape {shape:?})"
        )));
    }
    let mut packed = vec![0u8; numel.div_ceil(2)];
    let mut absmax = vec![0.0f32; numel.div_ceil(blocksize)];
    match input {
        FloatSlice::F32(v) => {
            blockwise::quantize(v, quant_type, blocksize, &mut packed, &mut absmax)
        }
        FloatSlice::F16(v) => {
            blockwise::quantize(v, quant_type, blocksize, &mut packed, &mut absmax)
        }
        FloatSlice::BF16(v) => {
            blockwise::quantize(v, quant_type, blocksize, &mut packed, &mut absmax)
        }
    }
    let absmax = if double_quant {
        Absmax::Double(DoubleQuant::compress(absmax))
    } else {
        Absmax::Plain(absmax)
    };
    Ok(Quantized4 {
        quant_type,
        blocksize,
        shape: shape.to_vec(),
        dtype: input.dtype(),
        packed,
        absmax,
    })
}

/// `bitsandbytes.functional.dequantize_4bit`, widened to f32: each value is the kernel's
/// `code[q] * absmax` rounded to `q.dtype`. Errors when `q`'s fields disagree.
pub fn dequantize_4bit(q: &Quantized4) -> Result<Vec<f32>> {
    q.validate()?;
    let mut out = vec![0.0f32; q.numel()];
    dequantize_4bit_into(q, &mut out)?;
    Ok(out)
}

/// `dequantize_4bit` into a caller's buffer of `q.numel()` values (one that is reused avoids
/// the page faults of fresh memory, a quarter of the time for a large tensor).
pub fn dequantize_4bit_into(q: &Quantized4, out: &mut [f32]) -> Result<()> {
    q.validate()?;
    if out.len() != q.numel() {
        return Err(Error::Invalid(format!(
            "dequantizing {} values of shape {:?} into a buffer of {}",
            q.numel(),
            q.shape,
            out.len()
        )));
    }
    let absmax = q.absmax.to_f32()?;
    blockwise::dequantize(&q.packed, &absmax, q.quant_type, q.blocksize, q.dtype, out);
    Ok(())
}

/// Converts f32 values to the given input dtype's slice storage, for callers (tests,
/// benchmarks) that start from f32 and want bitsandbytes' behaviour on a cast tensor.
pub fn cast_f32(values: &[f32], dtype: DType) -> Result<FloatData<'static>> {
    check_dtype(dtype)?;
    Ok(match dtype {
        DType::F16 => FloatData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
        DType::BF16 => FloatData::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
        _ => FloatData::F32(values.to_vec().into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 250.0 - 2.0) * (1.0 + (i % 5) as f32))
            .collect()
    }

    #[test]
    fn rejects_bad_blocksize_shape_and_empty_input() {
        let x = sample(64);
        let q = |shape: &[usize], bs| {
            quantize_4bit(FloatSlice::F32(&x), shape, QuantType::Nf4, bs, false)
        };
        assert!(matches!(q(&[64], 48), Err(Error::Invalid(_))));
        assert!(matches!(q(&[64], 8192), Err(Error::Invalid(_))));
        assert!(matches!(q(&[8, 9], 64), Err(Error::Invalid(_))));
        assert!(quantize_4bit(FloatSlice::F32(&[]), &[0], QuantType::Nf4, 64, false).is_err());
        for bs in BLOCKSIZES {
            assert!(q(&[8, 8], bs).is_ok(), "{bs}");
        }
    }

    #[test]
    fn round_trip_error_is_bounded_by_the_codebook_gap() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for dq in [false, true] {
                let x = sample(1001);
                let q = quantize_4bit(FloatSlice::F32(&x), &[7, 143], qt, 64, dq).unwrap();
                assert_eq!(q.packed.len(), 501);
                let y = dequantize_4bit(&q).unwrap();
                let absmax = q.absmax.to_f32().unwrap();
                for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                    // The widest gap between neighbouring codes is 1/3 (FP4 2/3..1).
                    assert!(
                        (a - b).abs() <= absmax[i / 64] * 0.34,
                        "{qt} {dq} {i}: {a} {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn dequantize_rejects_inconsistent_fields() {
        let x = sample(256);
        let mut q = quantize_4bit(FloatSlice::F32(&x), &[256], QuantType::Nf4, 64, false).unwrap();
        q.packed.pop();
        assert!(dequantize_4bit(&q).is_err());
        q.packed.push(0);
        q.absmax = Absmax::Plain(vec![1.0; 3]);
        assert!(dequantize_4bit(&q).is_err());
        q.absmax = Absmax::Plain(vec![1.0; 4]);
        assert!(dequantize_4bit_into(&q, &mut [0.0; 255]).is_err());
        q.dtype = DType::I32;
        assert!(dequantize_4bit(&q).is_err());
    }

    #[test]
    fn quant_type_names_round_trip() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            assert_eq!(qt.as_str().parse::<QuantType>().unwrap(), qt);
        }
        assert!("int4".parse::<QuantType>().is_err());
    }
}
