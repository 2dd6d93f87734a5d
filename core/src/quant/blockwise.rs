//! Blockwise 4-bit quantization and dequantization of a flat tensor, as bitsandbytes' CUDA
//! kernels (`kQuantizeBlockwise<FP4|NF4>`, `kDequantizeBlockwise`) compute them, spread over
//! threads by runs of whole blocks. Nothing is allocated beyond the outputs but one block of
//! f32 scratch per run.

use rayon::prelude::*;

use super::codebook::{decode_table, Encode4, Fp4, Nf4};
use super::fast_math::{fast_reciprocal, mul_ftz};
use super::float_slice::{round_through, Element};
use super::QuantType;
use crate::DType;

/// Elements each parallel job handles (rounded to whole blocks): large enough to amortize the
/// job, small enough to balance two to dozens of threads on one weight matrix.
const JOB_ELEMENTS: usize = 1 << 16;

fn blocks_per_job(blocksize: usize) -> usize {
    (JOB_ELEMENTS / blocksize).max(1)
}

/// The block's absmax as the kernel reduces it: `fmaxf` over `|x|` starting at `-FLT_MAX`, so
/// NaN elements are ignored, and subnormals count as zero (`.ftz`). A `partial` (last) block is
/// padded with zeros inside the kernel, which then take part in the maximum.
#[inline]
pub(crate) fn block_absmax(values: &[f32], partial: bool) -> f32 {
    // On |x| bits the integer order is the float order; NaN maps below every number.
    const INF_BITS: i32 = 0x7f80_0000;
    const MIN_NORMAL_BITS: i32 = 0x0080_0000;
    let max_bits = values
        .iter()
        .map(|x| {
            let bits = (x.to_bits() & 0x7fff_ffff) as i32;
            if bits > INF_BITS {
                -1
            } else if bits < MIN_NORMAL_BITS {
                0
            } else {
                bits
            }
        })
        .fold(-1, i32::max);
    match (max_bits, partial) {
        (b, _) if b >= 0 => f32::from_bits(b as u32),
        (_, true) => 0.0,
        (_, false) => -f32::MAX,
    }
}

/// Quantizes `src` into `packed` ((len + 1) / 2 bytes) and `absmax` (one per block).
pub(crate) fn quantize<T: Element>(
    src: &[T],
    quant_type: QuantType,
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    match quant_type {
        QuantType::Nf4 => quantize_with::<T, Nf4>(src, blocksize, packed, absmax),
        QuantType::Fp4 => quantize_with::<T, Fp4>(src, blocksize, packed, absmax),
    }
}

fn quantize_with<T: Element, E: Encode4>(
    src: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    let job_blocks = blocks_per_job(blocksize);
    src.par_chunks(job_blocks * blocksize)
        .zip(packed.par_chunks_mut(job_blocks * blocksize / 2))
        .zip(absmax.par_chunks_mut(job_blocks))
        .for_each(|((src, packed), absmax)| {
            let mut scratch = vec![0.0f32; blocksize.min(src.len())];
            for ((block, out), block_max) in src
                .chunks(blocksize)
                .zip(packed.chunks_mut(blocksize / 2))
                .zip(absmax)
            {
                let values = &mut scratch[..block.len()];
                T::widen(block, values);
                *block_max = block_absmax(values, block.len() < blocksize);
                encode_block::<E>(values, fast_reciprocal(*block_max), out);
            }
        });
}

/// Two codes per byte, the even element in the high nibble. The kernel scales by the
/// (approximate) reciprocal of absmax (so an all-zero block gives 0 * inf = NaN, code 0), and
/// for an odd count quantizes the zero it padded the block with into the last low nibble (NF4:
/// code 7, the code of 0.0).
#[inline]
fn encode_block<E: Encode4>(values: &[f32], scale: f32, out: &mut [u8]) {
    let pairs = values.chunks_exact(2);
    let rest = pairs.remainder();
    for (byte, pair) in out.iter_mut().zip(pairs) {
        *byte = (E::encode(mul_ftz(pair[0], scale)) << 4) | E::encode(mul_ftz(pair[1], scale));
    }
    if let ([last], Some(byte)) = (rest, out.last_mut()) {
        *byte = (E::encode(mul_ftz(*last, scale)) << 4) | E::encode(mul_ftz(0.0, scale));
    }
}

/// Dequantizes into `out` (one value per element): `code[q] * absmax` in f32 (`.ftz`), rounded
/// through `dtype` as the kernel stores it into a tensor of the input's dtype.
pub(crate) fn dequantize(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    blocksize: usize,
    dtype: DType,
    out: &mut [f32],
) {
    let decode = decode_table(quant_type);
    let job_blocks = blocks_per_job(blocksize);
    out.par_chunks_mut(job_blocks * blocksize)
        .zip(packed.par_chunks(job_blocks * blocksize / 2))
        .zip(absmax.par_chunks(job_blocks))
        .for_each(|((out, packed), absmax)| {
            for ((out, bytes), &block_max) in out
                .chunks_mut(blocksize)
                .zip(packed.chunks(blocksize / 2))
                .zip(absmax)
            {
                let table = decode.map(|c| round_through(dtype, mul_ftz(c, block_max)));
                let mut pairs = out.chunks_exact_mut(2);
                for (pair, &byte) in (&mut pairs).zip(bytes) {
                    pair[0] = table[(byte >> 4) as usize];
                    pair[1] = table[(byte & 0x0f) as usize];
                }
                if let ([last], Some(&byte)) = (pairs.into_remainder(), bytes.last()) {
                    *last = table[(byte >> 4) as usize];
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absmax_ignores_nan_and_pads_partial_blocks_with_zero() {
        assert_eq!(block_absmax(&[1.0, -3.5, f32::NAN, 2.0], false), 3.5);
        assert_eq!(block_absmax(&[-0.0, 0.0], false), 0.0);
        assert_eq!(block_absmax(&[f32::NEG_INFINITY], false), f32::INFINITY);
        assert_eq!(block_absmax(&[f32::NAN], false), -f32::MAX);
        assert_eq!(block_absmax(&[f32::NAN], true), 0.0);
        assert_eq!(block_absmax(&[1e-40, -1e-39], false), 0.0);
    }

    #[test]
    fn odd_count_pads_with_a_quantized_zero() {
        let mut out = [0u8; 2];
        encode_block::<Nf4>(&[1.0, -1.0, 1.0], 1.0, &mut out);
        assert_eq!(out, [0xf0, 0xf7]);
        encode_block::<Nf4>(&[0.0, 0.0, 0.0], f32::INFINITY, &mut out);
        assert_eq!(out, [0x00, 0x00]);
    }
}
