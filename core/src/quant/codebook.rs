//! The NF4 and FP4 4-bit codes: the codebooks bitsandbytes stores (`QuantState.code`), the
//! encoders its CUDA kernel runs (`dQuantizeNF4`, `dQuantizeFP4` in csrc), and the decode
//! tables its dequantization kernel multiplies by the block's absmax.

use super::QuantType;

/// `get_4bit_type("nf4")`: the normal-float quantiles, already normalized to [-1, 1].
/// Written as f64 and narrowed, as `torch.tensor(list_of_python_floats)` does.
const NF4_CODE: [f32; 16] = [
    -1.0f64 as f32,
    -0.6961928009986877f64 as f32,
    -0.5250730514526367f64 as f32,
    -0.39491748809814453f64 as f32,
    -0.28444138169288635f64 as f32,
    -0.18477343022823334f64 as f32,
    -0.09105003625154495f64 as f32,
    0.0,
    0.07958029955625534f64 as f32,
    0.16093020141124725f64 as f32,
    0.24611230194568634f64 as f32,
    0.33791524171829224f64 as f32,
    0.44070982933044434f64 as f32,
    0.5626170039176941f64 as f32,
    0.7229568362236023f64 as f32,
    1.0,
];

/// The FP4 magnitudes of the kernel's `dDequantizeFP4Tree` for bits 2..0 (bit 3 is the sign):
/// e2m1 with bias 3 scaled by 1/12. Not `create_fp8_map`, whose subnormal differs.
#[allow(clippy::excessive_precision)] // the kernel's literals, verbatim
const FP4_MAGNITUDE: [f32; 8] = [
    0.0,
    5.208333333e-03,
    0.66666667,
    1.0,
    0.33333333,
    0.5,
    0.16666667,
    0.25,
];

/// `get_4bit_type("fp4")`: the magnitudes, then their negatives. bitsandbytes writes the
/// negative zero as the Python integer `-0`, so code 8 is +0.0 in the stored codebook.
const FP4_CODE: [f32; 16] = {
    let mut code = [0.0f32; 16];
    let mut i = 0;
    while i < 8 {
        code[i] = FP4_MAGNITUDE[i];
        code[i + 8] = if i == 0 { 0.0 } else { -FP4_MAGNITUDE[i] };
        i += 1;
    }
    code
};

/// What `dequantize_4bit` multiplies by absmax: the codebook, except that the FP4 kernel
/// applies the sign as a factor (`0 * absmax * -1`), so code 8 decodes to -0.0.
const FP4_DECODE: [f32; 16] = {
    let mut code = FP4_CODE;
    code[8] = -0.0;
    code
};

/// The 15 decision thresholds of `dQuantizeNF4`, ascending, as the kernel's `f` literals.
/// Its tree compares with strict `>`, and since the thresholds are sorted the code it reaches
/// is the number of thresholds the value exceeds; NaN exceeds none and gets code 0.
#[allow(clippy::excessive_precision)] // the kernel's literals, verbatim
const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// The 7 thresholds of `dQuantizeFP4` on |x|, ascending, as the kernel's `f` literals.
/// Exceeding k of them selects the k-th magnitude in ascending order.
#[allow(clippy::excessive_precision)] // the kernel's literals, verbatim
const FP4_THRESHOLDS: [f32; 7] = [
    0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333,
];

/// The codebook bitsandbytes stores with the quantized tensor (`quant_map`).
pub fn codebook(quant_type: QuantType) -> &'static [f32; 16] {
    match quant_type {
        QuantType::Nf4 => &NF4_CODE,
        QuantType::Fp4 => &FP4_CODE,
    }
}

/// The values the dequantization kernel multiplies by absmax, by code.
pub fn decode_table(quant_type: QuantType) -> &'static [f32; 16] {
    match quant_type {
        QuantType::Nf4 => &NF4_CODE,
        QuantType::Fp4 => &FP4_DECODE,
    }
}

/// A 4-bit encoder of a value already scaled by 1/absmax, as the CUDA kernel computes it.
/// Branchless, so that a loop over a block vectorizes.
pub(crate) trait Encode4 {
    fn encode(x: f32) -> u8;
    /// `encode` of a group at once, written threshold by threshold over fixed-size arrays so
    /// that the compiler vectorizes it across the group.
    fn encode_group<const N: usize>(x: &[f32; N], codes: &mut [u8; N]);
}

pub(crate) struct Nf4;
pub(crate) struct Fp4;

impl Encode4 for Nf4 {
    #[inline(always)]
    fn encode(x: f32) -> u8 {
        NF4_THRESHOLDS.iter().map(|&t| (x > t) as u32).sum::<u32>() as u8
    }

    #[inline(always)]
    fn encode_group<const N: usize>(x: &[f32; N], codes: &mut [u8; N]) {
        let mut rank = [0u32; N];
        for t in NF4_THRESHOLDS {
            for (r, &v) in rank.iter_mut().zip(x) {
                *r += (v > t) as u32;
            }
        }
        for (code, r) in codes.iter_mut().zip(rank) {
            *code = r as u8;
        }
    }
}

impl Encode4 for Fp4 {
    #[inline(always)]
    fn encode(x: f32) -> u8 {
        let sign = ((x < 0.0) as u8) << 3;
        let a = x.abs();
        let rank = FP4_THRESHOLDS.iter().map(|&t| (a > t) as u32).sum::<u32>() as u8;
        fp4_code(rank) | sign
    }

    #[inline(always)]
    fn encode_group<const N: usize>(x: &[f32; N], codes: &mut [u8; N]) {
        let mut rank = [0u32; N];
        for t in FP4_THRESHOLDS {
            for (r, &v) in rank.iter_mut().zip(x) {
                *r += (v.abs() > t) as u32;
            }
        }
        for ((code, r), &v) in codes.iter_mut().zip(rank).zip(x) {
            *code = fp4_code(r as u8) | (((v < 0.0) as u8) << 3);
        }
    }
}

/// The FP4 magnitude code of the value ranked `rank` (0..8) in ascending order: magnitudes
/// ascend at codes 0,1,6,7,4,5,2,3, i.e. bit 2 flips with bit 1.
#[inline(always)]
fn fp4_code(rank: u8) -> u8 {
    rank ^ ((rank & 0b010) << 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(qt: QuantType, code: u8) -> f32 {
        decode_table(qt)[code as usize]
    }

    #[test]
    fn nf4_thresholds_lie_between_neighbouring_codes() {
        for (i, t) in NF4_THRESHOLDS.iter().enumerate() {
            assert!(NF4_CODE[i] < *t && *t < NF4_CODE[i + 1], "threshold {i}");
        }
    }

    #[test]
    fn every_code_encodes_to_itself() {
        for code in 0..16u8 {
            assert_eq!(Nf4::encode(decoded(QuantType::Nf4, code)), code);
            // FP4 +0 and -0 both encode to code 0 (the kernel tests `x < 0`).
            let expect = if code == 8 { 0 } else { code };
            assert_eq!(Fp4::encode(decoded(QuantType::Fp4, code)), expect);
        }
    }

    #[test]
    fn thresholds_take_the_lower_code_and_nan_gets_zero() {
        assert_eq!(Nf4::encode(NF4_THRESHOLDS[7]), 7);
        assert_eq!(Nf4::encode(f32::NAN), 0);
        assert_eq!(Fp4::encode(FP4_THRESHOLDS[0]), 0);
        assert_eq!(Fp4::encode(-FP4_THRESHOLDS[6]), 0b1010);
        assert_eq!(Fp4::encode(f32::NAN), 0);
    }

    #[test]
    fn group_encoding_agrees_with_single_values() {
        let x: [f32; 64] = std::array::from_fn(|i| (i as f32 - 31.5) / 31.0);
        let mut codes = [0u8; 64];
        Nf4::encode_group(&x, &mut codes);
        assert!(x.iter().zip(&codes).all(|(&v, &c)| Nf4::encode(v) == c));
        Fp4::encode_group(&x, &mut codes);
        assert!(x.iter().zip(&codes).all(|(&v, &c)| Fp4::encode(v) == c));
    }

    #[test]
    fn fp4_rank_maps_to_the_kernel_codes() {
        let mut prev = -1.0;
        for rank in 0..8u8 {
            let code = fp4_code(rank);
            assert!(FP4_MAGNITUDE[code as usize] > prev, "rank {rank}");
            prev = FP4_MAGNITUDE[code as usize];
        }
    }
}
