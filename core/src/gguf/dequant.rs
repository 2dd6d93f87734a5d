//! Dequantization of the ggml types the demo model uses (F32, F16, Q4_1, Q8_0) to f32, computed
//! as ggml and gguf-py compute it (product then sum in f32, no fused multiply-add), so the values
//! are bit-identical to theirs.

use super::GgmlType;
use crate::{Error, Result};
use half::f16;

/// Elements per block of the 32-element quantized types.
const QK: usize = 32;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Q4_1 block (20 bytes): scale `d` (f16), minimum `m` (f16), 16 bytes of 4-bit codes; element
/// `j` is the low nibble of byte `j`, element `j + 16` the high nibble; value = code * d + m.
fn q4_1(block: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    for (j, &byte) in block[4..20].iter().enumerate() {
        out[j] = f32::from(byte & 0x0f) * d + m;
        out[j + QK / 2] = f32::from(byte >> 4) * d + m;
    }
}

/// Q8_0 block (34 bytes): scale `d` (f16), 32 signed bytes; value = code * d.
fn q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (o, &q) in out.iter_mut().zip(&block[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

/// The f32 values of `bytes`, which hold `n_elements` values of `ggml_type` (the data of one
/// tensor). An unsupported type or a wrong byte count is an [`Error::Invalid`];
/// [`super::Gguf::tensor_f32`] names the file and tensor in it.
pub fn dequantize(ggml_type: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    let expected = ggml_type.byte_size(n_elements as u64);
    if expected != Some(bytes.len() as u64) {
        return Err(Error::Invalid(format!(
            "{} bytes do not hold {n_elements} {ggml_type} values",
            bytes.len()
        )));
    }
    let mut out = vec![0f32; n_elements];
    let blockwise = |out: &mut [f32], f: fn(&[u8], &mut [f32])| {
        let block_bytes = ggml_type.type_size as usize;
        for (block, values) in bytes
            .chunks_exact(block_bytes)
            .zip(out.chunks_exact_mut(QK))
        {
            f(block, values);
        }
    };
    match ggml_type.name {
        "F32" => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        "F16" => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        "Q4_1" => blockwise(&mut out, q4_1),
        "Q8_0" => blockwise(&mut out, q8_0),
        other => {
            return Err(Error::Invalid(format!(
                "dequantizing {other} is not supported (F32, F16, Q4_1, Q8_0 are)"
            )))
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q4_1_block_uses_low_then_high_nibbles() {
        let mut block = Vec::new();
        block.extend(f16_bytes(0.5));
        block.extend(f16_bytes(-1.0));
        block.extend((0..16u8).map(|j| (15 - j) << 4 | j));
        let values = dequantize(GgmlType::Q4_1, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(values[j], j as f32 * 0.5 - 1.0);
            assert_eq!(values[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn q8_0_block_is_signed_codes_times_scale() {
        let mut block = Vec::new();
        block.extend(f16_bytes(0.25));
        block.extend((0..32i8).map(|j| (j - 16) as u8));
        let values = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
        let expect: Vec<f32> = (0..32).map(|j| (j - 16) as f32 * 0.25).collect();
        assert_eq!(values, expect);
    }

    #[test]
    fn plain_types_and_errors() {
        let f32_bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            dequantize(GgmlType::F32, &f32_bytes, 2).unwrap(),
            vec![1.5, -2.0]
        );
        let f16_bytes: Vec<u8> = [f16_bytes(0.75), f16_bytes(-4.0)].concat();
        assert_eq!(
            dequantize(GgmlType::F16, &f16_bytes, 2).unwrap(),
            vec![0.75, -4.0]
        );
        let msg = dequantize(GgmlType::Q8_0, &[0; 33], 32)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("33 bytes do not hold 32 Q8_0 values"), "{msg}");
        let q4_0 = GgmlType::from_id(2).unwrap();
        let msg = dequantize(q4_0, &[0; 18], 32).unwrap_err().to_string();
        assert!(msg.contains("dequantizing Q4_0 is not supported"), "{msg}");
    }
}
