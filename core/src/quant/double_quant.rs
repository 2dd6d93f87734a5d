//! Double quantization: the per-block absmax of a 4-bit tensor, itself quantized to 8 bits
//! with the signed dynamic map in blocks of 256 (`compress_statistics=True`).

use rayon::prelude::*;

use super::blockwise::block_absmax;
use super::dynamic_map::{dynamic_map_signed, quantize_8bit};
use super::fast_math::{fast_reciprocal, mul_ftz};
use super::torch_mean::torch_cuda_mean;
use crate::{Error, Result};

/// The block size bitsandbytes uses for the absmax of the absmax.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Absmax values quantized to 8 bits: `absmax[i] ≈ map[quantized[i]] *
/// nested_absmax[i / nested_blocksize] + offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One code of `dynamic_map_signed()` per 4-bit block.
    pub quantized: Vec<u8>,
    /// The absmax of each nested block of `absmax - offset`.
    pub nested_absmax: Vec<f32>,
    /// The mean of the absmax values, as torch computes it on CUDA.
    pub offset: f32,
    pub nested_blocksize: usize,
}

impl DoubleQuant {
    /// Quantizes `absmax` as `quantize_4bit(compress_statistics=True)` does: subtract the mean
    /// (torch, IEEE), then 8-bit blockwise quantization (the fast-math kernel). Reuses
    /// `absmax`'s storage for the centred values.
    pub fn compress(mut absmax: Vec<f32>) -> DoubleQuant {
        let offset = torch_cuda_mean(&absmax);
        absmax.iter_mut().for_each(|a| *a -= offset);
        let map = dynamic_map_signed();
        let nested_absmax: Vec<f32> = absmax
            .par_chunks(NESTED_BLOCKSIZE)
            .map(|block| block_absmax(block, block.len() < NESTED_BLOCKSIZE))
            .collect();
        let mut quantized = vec![0u8; absmax.len()];
        quantized
            .par_chunks_mut(NESTED_BLOCKSIZE)
            .zip(absmax.par_chunks(NESTED_BLOCKSIZE))
            .zip(&nested_absmax)
            .for_each(|((codes, block), &nested)| {
                let scale = fast_reciprocal(nested);
                for (code, &v) in codes.iter_mut().zip(block) {
                    *code = quantize_8bit(&map, mul_ftz(v, scale));
                }
            });
        DoubleQuant {
            quantized,
            nested_absmax,
            offset,
            nested_blocksize: NESTED_BLOCKSIZE,
        }
    }

    /// The absmax values as `dequantize_4bit` uses them: `map[q] * nested_absmax + offset`,
    /// two float32 roundings (no fused multiply-add): bitsandbytes' 8-bit dequantization kernel
    /// (`.ftz` product), then torch's `absmax += offset` (IEEE).
    pub fn expand(&self) -> Result<Vec<f32>> {
        if self.nested_blocksize == 0 {
            return Err(Error::Invalid("nested blocksize is 0".into()));
        }
        let blocks = self.quantized.len().div_ceil(self.nested_blocksize);
        if self.nested_absmax.len() != blocks {
            return Err(Error::Invalid(format!(
                "{} quantized absmax values in blocks of {} need {blocks} nested absmax values, \
                 not {}",
                self.quantized.len(),
                self.nested_blocksize,
                self.nested_absmax.len()
            )));
        }
        let map = dynamic_map_signed();
        Ok(self
            .quantized
            .chunks(self.nested_blocksize)
            .zip(&self.nested_absmax)
            .flat_map(|(block, &nested)| {
                block
                    .iter()
                    .map(move |&q| mul_ftz(map[q as usize], nested) + self.offset)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expanded_absmax_is_close_and_blocks_are_counted() {
        let absmax: Vec<f32> = (0..700)
            .map(|i| 0.5 + (i as f32 * 0.37).sin().abs())
            .collect();
        let dq = DoubleQuant::compress(absmax.clone());
        assert_eq!(dq.quantized.len(), 700);
        assert_eq!(dq.nested_absmax.len(), 3);
        let back = dq.expand().unwrap();
        for (a, b) in absmax.iter().zip(&back) {
            // 8-bit dynamic codes near the top of [-1, 1] are ~1/64 apart.
            assert!((a - b).abs() <= 0.01 * dq.nested_absmax[0], "{a} {b}");
        }
        let broken = DoubleQuant {
            nested_absmax: vec![1.0],
            ..dq
        };
        assert!(broken.expand().is_err());
    }
}
