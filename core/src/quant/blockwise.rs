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

/// AVX2 builds of the job functions (x86-64 builds otherwise target SSE2 only). They compute the
/// same bits: Rust never fuses or reorders float operations, so only the vector width changes.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_job<T: Element, E: Encode4>(
        src: &[T],
        blocksize: usize,
        packed: &mut [u8],
        absmax: &mut [f32],
        scratch: &mut [f32],
    ) {
        super::quantize_job::<T, E>(src, blocksize, packed, absmax, scratch)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_job(
        packed: &[u8],
        absmax: &[f32],
        decode: &[f32; 16],
        blocksize: usize,
        dtype: DType,
        out: &mut [f32],
    ) {
        super::dequantize_job(packed, absmax, decode, blocksize, dtype, out, decode_bytes)
    }

    /// `DecodeBytes` with a 16-entry table lookup in registers: 8 bytes give 16 nibbles in
    /// output order, each looks up both 8-entry halves (`vpermps`) and bit 3 picks one.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn decode_bytes(bytes: &[u8], table: &[f32; 16], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let low_half = _mm256_loadu_ps(table.as_ptr());
        let high_half = _mm256_loadu_ps(table.as_ptr().add(8));
        let lookup = |index: __m256i| {
            let low = _mm256_permutevar8x32_ps(low_half, index);
            let high = _mm256_permutevar8x32_ps(high_half, index);
            // blendv picks by the sign bit: move index bit 3 there.
            _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)))
        };
        let groups = bytes.chunks_exact(8);
        let rest = groups.remainder();
        let mut outs = out.chunks_exact_mut(16);
        for (group, out) in groups.zip(&mut outs) {
            let packed = _mm_loadl_epi64(group.as_ptr() as *const __m128i);
            let bytes = _mm256_cvtepu8_epi32(packed);
            let high = _mm256_srli_epi32(bytes, 4);
            let low = _mm256_and_si256(bytes, _mm256_set1_epi32(0x0f));
            // Per 128-bit lane: [h0 l0 h1 l1 | h4 l4 h5 l5] and [h2 l2 h3 l3 | h6 l6 h7 l7].
            let first = _mm256_unpacklo_epi32(high, low);
            let second = _mm256_unpackhi_epi32(high, low);
            let nibbles_0_7 = _mm256_permute2x128_si256(first, second, 0x20);
            let nibbles_8_15 = _mm256_permute2x128_si256(first, second, 0x31);
            _mm256_storeu_ps(out.as_mut_ptr(), lookup(nibbles_0_7));
            _mm256_storeu_ps(out.as_mut_ptr().add(8), lookup(nibbles_8_15));
        }
        super::decode_bytes(rest, table, outs.into_remainder());
    }
}

/// Elements each parallel job handles (rounded to whole blocks): large enough to amortize the
/// job, small enough to balance two to dozens of threads on one weight matrix.
const JOB_ELEMENTS: usize = 1 << 16;

fn blocks_per_job(blocksize: usize) -> usize {
    (JOB_ELEMENTS / blocksize).max(1)
}

/// The block's absmax as the kernel reduces it: `fmaxf` over `|x|` starting at `-FLT_MAX`, so
/// NaN elements are ignored, and subnormals count as zero (`.ftz`). A `partial` (last) block is
/// padded with zeros inside the kernel, which then take part in the maximum.
#[inline(always)]
pub(crate) fn block_absmax(values: &[f32], partial: bool) -> f32 {
    // On |x| bits the integer order is the float order; NaN maps below every number and a
    // subnormal to zero. Sixteen independent maxima keep the loop a plain vector operation.
    const INF_BITS: i32 = 0x7f80_0000;
    const MIN_NORMAL_BITS: i32 = 0x0080_0000;
    const ACCUMULATORS: usize = 16;
    let key = |x: &f32| {
        let bits = (x.to_bits() & 0x7fff_ffff) as i32;
        let bits = if bits < MIN_NORMAL_BITS { 0 } else { bits };
        if bits > INF_BITS {
            -1
        } else {
            bits
        }
    };
    let mut maxima = [-1i32; ACCUMULATORS];
    let groups = values.chunks_exact(ACCUMULATORS);
    let rest = groups.remainder();
    for group in groups {
        for (m, x) in maxima.iter_mut().zip(group) {
            *m = (*m).max(key(x));
        }
    }
    let max_bits = rest.iter().map(key).chain(maxima).fold(-1, i32::max);
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
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                // SAFETY: the CPU has AVX2, checked on the line above.
                unsafe { avx2::quantize_job::<T, E>(src, blocksize, packed, absmax, &mut scratch) };
                return;
            }
            quantize_job::<T, E>(src, blocksize, packed, absmax, &mut scratch);
        });
}

/// One job's run of whole blocks; `scratch` holds one block as f32.
#[inline(always)]
fn quantize_job<T: Element, E: Encode4>(
    src: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    scratch: &mut [f32],
) {
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
}

/// Elements encoded at a time into a fixed-size array, so that the compiler turns the
/// threshold comparisons into vector instructions across elements.
const LANES: usize = 32;

/// Two codes per byte, the even element in the high nibble. The kernel scales by the
/// (approximate) reciprocal of absmax (so an all-zero block gives 0 * inf = NaN, code 0).
#[inline(always)]
fn encode_block<E: Encode4>(values: &[f32], scale: f32, out: &mut [u8]) {
    let whole = values.len() / LANES * LANES;
    let (values, tail) = values.split_at(whole);
    let (out, out_tail) = out.split_at_mut(whole / 2);
    for (group, out) in values
        .chunks_exact(LANES)
        .zip(out.chunks_exact_mut(LANES / 2))
    {
        let mut scaled = [0.0f32; LANES];
        for (y, &x) in scaled.iter_mut().zip(group) {
            *y = mul_ftz(x, scale);
        }
        let mut codes = [0u8; LANES];
        E::encode_group(&scaled, &mut codes);
        for (byte, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
            *byte = (pair[0] << 4) | pair[1];
        }
    }
    encode_pairs::<E>(tail, scale, out_tail);
}

/// The pairwise form of `encode_block` for a short tail. For an odd count the kernel quantizes
/// the zero it padded the block with into the last low nibble (NF4: code 7, the code of 0.0).
#[inline(always)]
fn encode_pairs<E: Encode4>(values: &[f32], scale: f32, out: &mut [u8]) {
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
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                // SAFETY: the CPU has AVX2, checked on the line above.
                unsafe { avx2::dequantize_job(packed, absmax, decode, blocksize, dtype, out) };
                return;
            }
            // SAFETY: the portable decoder runs anywhere.
            unsafe { dequantize_job(packed, absmax, decode, blocksize, dtype, out, decode_bytes) };
        });
}

/// Writes the two values of each byte (high nibble first): `out.len() == 2 * bytes.len()`.
type DecodeBytes = unsafe fn(bytes: &[u8], table: &[f32; 16], out: &mut [f32]);

/// The portable `DecodeBytes`. (Unsafe only to share the type of the AVX2 one.)
#[inline(always)]
unsafe fn decode_bytes(bytes: &[u8], table: &[f32; 16], out: &mut [f32]) {
    for (pair, &byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = table[(byte >> 4) as usize];
        pair[1] = table[(byte & 0x0f) as usize];
    }
}

/// Safety: `decode_bytes` must run on this CPU.
#[inline(always)]
unsafe fn dequantize_job(
    packed: &[u8],
    absmax: &[f32],
    decode: &[f32; 16],
    blocksize: usize,
    dtype: DType,
    out: &mut [f32],
    decode_bytes: DecodeBytes,
) {
    for ((out, bytes), &block_max) in out
        .chunks_mut(blocksize)
        .zip(packed.chunks(blocksize / 2))
        .zip(absmax)
    {
        let table = decode.map(|c| round_through(dtype, mul_ftz(c, block_max)));
        let whole_bytes = out.len() / 2;
        let (pairs, last) = out.split_at_mut(whole_bytes * 2);
        decode_bytes(&bytes[..whole_bytes], &table, pairs);
        if let ([last], Some(&byte)) = (last, bytes.get(whole_bytes)) {
            *last = table[(byte >> 4) as usize];
        }
    }
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_decoder_writes_what_the_portable_one_does() {
        if !avx2::available() {
            eprintln!("skipped: no AVX2");
            return;
        }
        let table: [f32; 16] = std::array::from_fn(|i| i as f32 * 1.5 - 7.0);
        let bytes: Vec<u8> = (0..77u32).map(|i| (i * 37 + 11) as u8).collect();
        let (mut portable, mut simd) = (vec![0.0; 154], vec![0.0; 154]);
        // SAFETY: AVX2 is available (checked above); the portable decoder runs anywhere.
        unsafe {
            decode_bytes(&bytes, &table, &mut portable);
            avx2::decode_bytes(&bytes, &table, &mut simd);
        }
        assert_eq!(portable, simd);
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
