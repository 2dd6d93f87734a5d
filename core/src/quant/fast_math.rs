//! Float arithmetic as bitsandbytes' CUDA kernels do it: they are compiled with
//! `--use_fast_math`, so subnormal operands and results are flushed to zero (`.ftz`) and
//! `1.0f / x` is the hardware's approximate reciprocal (`rcp.approx.ftz.f32`, MUFU.RCP), which
//! for 13% of mantissas is one ulp away from the correctly rounded reciprocal. That ulp decides
//! the code of values that land on a decision threshold (ties such as 0.48828125 / 2.34375 =
//! 5/24 in bf16 and f16 input), so the reciprocal is reproduced bit for bit.
//!
//! `rcp_approx.deflate` (raw deflate) holds, for every mantissa m of x in [1, 2), two bits:
//! `bits(rcp.approx(x)) - bits(1/x correctly rounded) + 1` (0, 1 or 2), four to a byte, low
//! bits first. It was measured on an H200 (sm_90, nvcc 13.0) with
//! `__float_as_int(1.0f / x) - __float_as_int(__frcp_rn(x))` compiled `--use_fast_math`; the
//! same measurement for x in [2^-5, 2^-4) was identical, since the unit works on the mantissa.

use std::io::Read;
use std::sync::OnceLock;

const MANTISSA_BITS: u32 = 23;
const MANTISSA_MASK: u32 = (1 << MANTISSA_BITS) - 1;

static RCP_DELTAS_DEFLATE: &[u8] = include_bytes!("rcp_approx.deflate");

fn rcp_deltas() -> &'static [u8] {
    static DELTAS: OnceLock<Vec<u8>> = OnceLock::new();
    DELTAS.get_or_init(|| {
        let mut table = Vec::with_capacity(1 << (MANTISSA_BITS - 2));
        flate2::read::DeflateDecoder::new(RCP_DELTAS_DEFLATE)
            .read_to_end(&mut table)
            .expect("the embedded reciprocal table inflates");
        assert_eq!(
            table.len(),
            1 << (MANTISSA_BITS - 2),
            "reciprocal table size"
        );
        table
    })
}

/// Flushes a subnormal to a zero of the same sign (`.ftz`).
#[inline(always)]
pub(crate) fn ftz(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// `mul.ftz.f32`: a product with subnormal operands and result flushed.
#[inline(always)]
pub(crate) fn mul_ftz(a: f32, b: f32) -> f32 {
    ftz(ftz(a) * ftz(b))
}

/// `1.0f / x` under `--use_fast_math` (`rcp.approx.ftz.f32`).
pub(crate) fn fast_reciprocal(x: f32) -> f32 {
    let a = x.abs();
    let r = if a < f32::MIN_POSITIVE {
        f32::INFINITY
    } else if !a.is_finite() {
        1.0 / a
    } else {
        let rounded = 1.0 / a;
        if rounded < f32::MIN_POSITIVE {
            0.0
        } else {
            let m = (a.to_bits() & MANTISSA_MASK) as usize;
            let delta = (rcp_deltas()[m / 4] >> (2 * (m % 4))) & 0b11;
            f32::from_bits((rounded.to_bits() + delta as u32) - 1)
        }
    };
    r.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reciprocal_is_within_one_ulp_and_exact_on_powers_of_two() {
        for bits in (0x3f80_0000u32..0x4000_0000).step_by(4099) {
            let x = f32::from_bits(bits);
            let r = fast_reciprocal(x);
            let exact = 1.0 / x;
            assert!(r.to_bits().abs_diff(exact.to_bits()) <= 1, "{x}");
            assert_eq!(fast_reciprocal(x * 1024.0), r / 1024.0);
            assert_eq!(fast_reciprocal(-x), -r);
        }
        assert_eq!(fast_reciprocal(4.0), 0.25);
        // The tie of the golden data: bf16 0.48828125 in a block of absmax 2.34375.
        assert_eq!(
            fast_reciprocal(2.34375),
            f32::from_bits((1.0f32 / 2.34375).to_bits() - 1)
        );
    }

    #[test]
    fn zeros_subnormals_and_infinities_flush() {
        assert_eq!(fast_reciprocal(0.0), f32::INFINITY);
        assert_eq!(fast_reciprocal(1e-40), f32::INFINITY);
        assert_eq!(fast_reciprocal(f32::INFINITY), 0.0);
        assert_eq!(fast_reciprocal(f32::MAX), 0.0);
        assert!(fast_reciprocal(f32::NAN).is_nan());
        assert_eq!(mul_ftz(1e-20, 1e-20).to_bits(), 0);
        assert_eq!(mul_ftz(-1e-40, 1e30).to_bits(), (-0.0f32).to_bits());
        assert_eq!(mul_ftz(3.0, 0.5), 1.5);
    }
}
