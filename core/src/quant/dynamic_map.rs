//! bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`) and its 8-bit
//! blockwise quantizer (`kQuantizeBlockwise<General8bit>` with `dQuantize`), used to compress
//! the absmax of 4-bit blocks.

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: for exponents
/// 10^-6 ..= 10^0, the midpoints of `torch.linspace(0.1, 1, 2^i + 1)` (float32), scaled, with
/// both signs; then 0 and 1, sorted. 256 values: 127 negative, 0 at index 127, 128 positive.
pub fn dynamic_map_signed() -> [f32; 256] {
    const EXPONENT_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..EXPONENT_BITS {
        let boundaries = torch_linspace(0.1, 1.0, (1usize << i) + 1);
        // `10 ** e` is a Python float; multiplying the float32 tensor narrows it to float32.
        let scale = 10f64.powi(i - (EXPONENT_BITS - 1)) as f32;
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0.0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// `torch.linspace(start, end, steps, dtype=float32)` as ATen's CPU kernel computes it: float32
/// step, the first half counted up from `start`, the second half down from `end`, each as one
/// fused multiply-add (the compiler contracts `start + step * i` in the AVX2/AVX-512 builds
/// torch dispatches to; without the fusion 42 of the 256 map values differ by an ulp).
fn torch_linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `dQuantize<0>`: the binary search of the 8-bit kernel over a sorted 256-entry map, then the
/// nearest of the two neighbours by midpoint. Above the found value a tie goes to the lower
/// code, below it to the found (upper) one, exactly as the kernel's comparisons fall.
///
/// Written with selects instead of branches (the data decides every step, so branches would
/// mostly mispredict).
#[inline]
pub(crate) fn quantize_8bit(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        let above = x > val;
        lower_pivot = if above { pivot } else { lower_pivot };
        lower = if above { val } else { lower };
        upper_pivot = if above { upper_pivot } else { pivot };
        upper = if above { upper } else { val };
        pivot = if above { pivot + step } else { pivot - step };
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let chosen = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    chosen as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_is_sorted_symmetric_and_spans_minus_one_to_one() {
        let map = dynamic_map_signed();
        assert!(map.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(map[127], 0.0);
        assert_eq!(map[255], 1.0);
        for i in 0..127 {
            assert_eq!(map[i], -map[254 - i], "{i}");
        }
    }

    #[test]
    fn every_code_quantizes_to_itself_and_nan_to_zero() {
        let map = dynamic_map_signed();
        for (i, &v) in map.iter().enumerate() {
            assert_eq!(quantize_8bit(&map, v) as usize, i);
        }
        assert_eq!(quantize_8bit(&map, f32::NAN), 0);
        assert_eq!(quantize_8bit(&map, 2.0), 255);
        assert_eq!(quantize_8bit(&map, -2.0), 0);
    }
}
