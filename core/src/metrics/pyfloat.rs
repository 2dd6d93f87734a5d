//! The pieces of CPython's float and string semantics that the ADGEN numbers depend on, bit for
//! bit: `round(x, ndigits)`, `math.fsum`, the built-in `sum` of floats, and `str.isspace`.

/// CPython `round(x, ndigits)` for `0 <= ndigits <= 19`: the exact binary value of `x` rounded to
/// `ndigits` decimal places, ties to even (as `_Py_dg_dtoa` mode 3 does), then read back as the
/// nearest double (as `_Py_dg_strtod` does). Non-finite values round to themselves.
pub fn py_round(x: f64, ndigits: u32) -> f64 {
    assert!(ndigits <= 19, "py_round supports 0..=19 digits");
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let bits = x.to_bits();
    let biased_exp = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1u64 << 52) - 1);
    // |x| = mantissa * 2^exp exactly.
    let (mantissa, exp) = if biased_exp == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1u64 << 52), biased_exp - 1075)
    };
    if exp >= 0 {
        // An integer already: it rounds to itself at any number of decimal places.
        return x;
    }
    let shift = (-exp) as u32;
    // mantissa * 10^ndigits < 2^53 * 2^64, so it fits in u128.
    let scaled = u128::from(mantissa) * 10u128.pow(ndigits);
    let rounded = if shift >= 120 {
        // scaled < 2^117 <= half of 2^shift: rounds to 0.
        0
    } else {
        let quotient = scaled >> shift;
        let remainder = scaled & ((1u128 << shift) - 1);
        let half = 1u128 << (shift - 1);
        if remainder > half || (remainder == half && quotient & 1 == 1) {
            quotient + 1
        } else {
            quotient
        }
    };
    // Rust's decimal parsing is correctly rounded, as _Py_dg_strtod is.
    let magnitude: f64 = format!("{rounded}e-{ndigits}")
        .parse()
        .expect("a formatted integer with an exponent parses");
    magnitude.copysign(x)
}

/// CPython `math.fsum` of finite values: the sum rounded once, with Shewchuk's partials and
/// CPython's final half-even correction across partials.
pub fn fsum(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut partials: Vec<f64> = Vec::new();
    for value in values {
        debug_assert!(value.is_finite(), "fsum is ported for finite values");
        let mut x = value;
        let mut kept = 0;
        for j in 0..partials.len() {
            let mut y = partials[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        partials.truncate(kept);
        if x != 0.0 {
            partials.push(x);
        }
    }
    let Some(mut hi) = partials.pop() else {
        return 0.0;
    };
    let mut lo = 0.0;
    while let Some(y) = partials.pop() {
        let x = hi;
        hi = x + y;
        lo = y - (hi - x);
        if lo != 0.0 {
            break;
        }
    }
    // Half-even rounding across partials (CPython: "so that sum([1e-16, 1, 1e16]) rounds up").
    if let Some(&next) = partials.last() {
        if (lo < 0.0 && next < 0.0) || (lo > 0.0 && next > 0.0) {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
    }
    hi
}

/// CPython (3.12+) built-in `sum` over floats: Neumaier's compensated summation.
pub fn py_sum(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut sum = 0.0f64;
    let mut compensation = 0.0f64;
    for x in values {
        let t = sum + x;
        if sum.abs() >= x.abs() {
            compensation += (sum - t) + x;
        } else {
            compensation += (x - t) + sum;
        }
        sum = t;
    }
    if compensation != 0.0 && compensation.is_finite() {
        sum += compensation;
    }
    sum
}

/// CPython `str.isspace` for one character (what `str.split()` and `str.rstrip()` cut on). It is
/// Rust's `char::is_whitespace` plus the ASCII separators U+001C..U+001F.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// CPython `s.split()` with no argument: runs of whitespace separate, none are kept.
pub fn py_split_whitespace(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_isspace).filter(|w| !w.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_matches_cpython() {
        // Values checked with CPython 3.11.
        assert_eq!(py_round(37.851715, 4), 37.8517);
        assert_eq!(py_round(0.03125, 4), 0.0312); // exact tie, to even
        assert_eq!(py_round(0.09375, 4), 0.0938); // exact tie, to even
        assert_eq!(py_round(2.675, 2), 2.67); // 2.675 is below the tie in binary
        assert_eq!(py_round(1.00005, 4), 1.0001); // 1.00005 is 1.00005000000000010... in binary
        assert_eq!(py_round(-0.00001, 4), -0.0);
        assert!(py_round(-0.00001, 4).is_sign_negative());
        assert_eq!(py_round(2.5, 0), 2.0);
        assert_eq!(py_round(3.5, 0), 4.0);
        assert_eq!(py_round(1e300, 4), 1e300);
        assert_eq!(py_round(5e-324, 4), 0.0);
        assert_eq!(py_round(100.0 * (2.0 / 3.0), 4), 66.6667);
    }

    #[test]
    fn fsum_is_the_correctly_rounded_sum() {
        assert_eq!(fsum([0.1; 10]), 1.0);
        assert_eq!(fsum([1e-16, 1.0, 1e16]), 10000000000000002.0);
        assert_eq!(fsum([1e100, 1.0, -1e100, 1e-100]), 1.0);
        assert_eq!(fsum([]), 0.0);
    }

    #[test]
    fn sum_compensates_like_cpython_3_12() {
        // CPython 3.12: sum([0.1] * 10) == 1.0, where naive addition gives 0.9999999999999999.
        assert_eq!(py_sum([0.1; 10]), 1.0);
        assert_eq!(py_sum([1e100, 1.0, -1e100]), 1.0);
    }

    #[test]
    fn isspace_includes_the_ascii_separators() {
        assert!(py_isspace('\u{1f}') && py_isspace('\u{3000}') && py_isspace('\u{85}'));
        assert!(!py_isspace('\u{200b}') && !py_isspace('a'));
        let words: Vec<&str> = py_split_whitespace(" a\u{1c}b\u{3000} c ").collect();
        assert_eq!(words, ["a", "b", "c"]);
    }
}
