//! qlora's 4-bit quantization against bitsandbytes 0.50.2 on CUDA (`tests/fixtures/golden/
//! bnb_golden.*`, made by `anchors/golden.py`): for every case, the input cast to the case's
//! dtype must quantize to the same packed bytes, absmax (or double-quantized absmax, nested
//! absmax and offset), codebooks, and dequantize to the same values, bit for bit.

use std::sync::OnceLock;

use qlora_core::quant::{
    cast_f32, codebook, dequantize_4bit, dynamic_map_signed, quantize_4bit, Absmax, QuantType,
};
use qlora_core::DType;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

struct Golden {
    tensors: Vec<u8>,
    cases: Value,
}

fn golden() -> &'static Golden {
    static GOLDEN: OnceLock<Golden> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let dir = qlora_tests::fixtures().join("golden");
        let json = std::fs::read_to_string(dir.join("bnb_golden.json")).expect("bnb_golden.json");
        let meta: Value = serde_json::from_str(&json).expect("bnb_golden.json parses");
        Golden {
            tensors: std::fs::read(dir.join("bnb_golden.safetensors"))
                .expect("bnb_golden.safetensors"),
            cases: meta["cases"].clone(),
        }
    })
}

fn tensor(name: &str, dtype: Dtype) -> (Vec<usize>, Vec<u8>) {
    let st = SafeTensors::deserialize(&golden().tensors).expect("golden safetensors parses");
    let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(view.dtype(), dtype, "{name}");
    (view.shape().to_vec(), view.data().to_vec())
}

fn f32_tensor(name: &str) -> (Vec<usize>, Vec<f32>) {
    let (shape, bytes) = tensor(name, Dtype::F32);
    let values = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (shape, values)
}

fn u8_tensor(name: &str) -> Vec<u8> {
    tensor(name, Dtype::U8).1
}

/// Asserts bitwise equality (so -0.0 differs from 0.0), naming the first difference.
fn assert_same_bits(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let differing: Vec<usize> = (0..ours.len())
        .filter(|&i| ours[i].to_bits() != theirs[i].to_bits())
        .collect();
    if let Some(&i) = differing.first() {
        panic!(
            "{what}: {} of {} values differ, first at {i}: ours {:e}, bitsandbytes {:e}",
            differing.len(),
            ours.len(),
            ours[i],
            theirs[i]
        );
    }
}

fn assert_same_bytes(what: &str, ours: &[u8], theirs: &[u8]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let differing: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect();
    if let Some(&i) = differing.first() {
        panic!(
            "{what}: {} of {} bytes differ, first at {i}: ours {:#04x}, bitsandbytes {:#04x}",
            differing.len(),
            ours.len(),
            ours[i],
            theirs[i]
        );
    }
}

/// One case `{nf4|fp4}_bs{N}_{dq|nodq}_{float32|bfloat16|float16}`.
fn check_case(case: &str) {
    let parts: Vec<&str> = case.split('_').collect();
    let [quant_type, blocksize, double_quant, dtype] = parts[..] else {
        panic!("case name {case}")
    };
    let quant_type: QuantType = quant_type.parse().unwrap();
    let blocksize: usize = blocksize.trim_start_matches("bs").parse().unwrap();
    let double_quant = double_quant == "dq";
    let dtype = DType::parse_float(dtype).unwrap();
    let meta = &golden().cases[case];
    assert_eq!(meta["blocksize"].as_u64(), Some(blocksize as u64), "{case}");
    assert_eq!(
        meta["dtype"].as_str(),
        Some(format!("torch.{dtype}").as_str())
    );

    let (shape, input) = f32_tensor("input_f32");
    let meta_shape: Vec<usize> = serde_json::from_value(meta["shape"].clone()).unwrap();
    assert_eq!(shape, meta_shape, "{case}: shape");
    let data = cast_f32(&input, dtype).unwrap();
    let q = quantize_4bit(data.as_slice(), &shape, quant_type, blocksize, double_quant).unwrap();

    assert_same_bytes(
        &format!("{case}.packed"),
        &q.packed,
        &u8_tensor(&format!("{case}.packed")),
    );
    match (&q.absmax, double_quant) {
        (Absmax::Plain(absmax), false) => {
            let (_, theirs) = f32_tensor(&format!("{case}.absmax"));
            assert_same_bits(&format!("{case}.absmax"), absmax, &theirs);
        }
        (Absmax::Double(dq), true) => {
            let offset = meta["offset"].as_f64().unwrap() as f32;
            assert_eq!(
                dq.offset.to_bits(),
                offset.to_bits(),
                "{case}: offset {}",
                dq.offset
            );
            assert_eq!(
                Some(dq.nested_blocksize as u64),
                meta["nested_blocksize"].as_u64()
            );
            assert_same_bytes(
                &format!("{case}.absmax_u8"),
                &dq.quantized,
                &u8_tensor(&format!("{case}.absmax_u8")),
            );
            let (_, nested) = f32_tensor(&format!("{case}.nested_absmax"));
            assert_same_bits(&format!("{case}.nested_absmax"), &dq.nested_absmax, &nested);
            let (_, nested_code) = f32_tensor(&format!("{case}.nested_code"));
            assert_same_bits(
                &format!("{case}.nested_code"),
                &dynamic_map_signed(),
                &nested_code,
            );
        }
        (absmax, _) => panic!("{case}: unexpected absmax kind {absmax:?}"),
    }
    let (_, code) = f32_tensor(&format!("{case}.code"));
    assert_same_bits(&format!("{case}.code"), codebook(quant_type), &code);
    let (_, dequant) = f32_tensor(&format!("{case}.dequant"));
    assert_same_bits(
        &format!("{case}.dequant"),
        &dequantize_4bit(&q).unwrap(),
        &dequant,
    );
}

macro_rules! golden_cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                check_case(stringify!($case));
            }
        )*

        #[test]
        fn every_golden_case_has_a_test() {
            let mut ours = vec![$(stringify!($case)),*];
            let mut theirs: Vec<&str> = golden().cases.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            ours.sort_unstable();
            theirs.sort_unstable();
            assert_eq!(ours, theirs);
        }
    };
}

golden_cases!(
    nf4_bs64_nodq_float32,
    nf4_bs64_nodq_bfloat16,
    nf4_bs64_nodq_float16,
    nf4_bs64_dq_float32,
    nf4_bs64_dq_bfloat16,
    nf4_bs64_dq_float16,
    nf4_bs128_nodq_float32,
    nf4_bs128_nodq_bfloat16,
    nf4_bs128_nodq_float16,
    nf4_bs128_dq_float32,
    nf4_bs128_dq_bfloat16,
    nf4_bs128_dq_float16,
    nf4_bs256_nodq_float32,
    nf4_bs256_nodq_bfloat16,
    nf4_bs256_nodq_float16,
    nf4_bs256_dq_float32,
    nf4_bs256_dq_bfloat16,
    nf4_bs256_dq_float16,
    fp4_bs64_nodq_float32,
    fp4_bs64_nodq_bfloat16,
    fp4_bs64_nodq_float16,
    fp4_bs64_dq_float32,
    fp4_bs64_dq_bfloat16,
    fp4_bs64_dq_float16,
    fp4_bs128_nodq_float32,
    fp4_bs128_nodq_bfloat16,
    fp4_bs128_nodq_float16,
    fp4_bs128_dq_float32,
    fp4_bs128_dq_bfloat16,
    fp4_bs128_dq_float16,
    fp4_bs256_nodq_float32,
    fp4_bs256_nodq_bfloat16,
    fp4_bs256_nodq_float16,
    fp4_bs256_dq_float32,
    fp4_bs256_dq_bfloat16,
    fp4_bs256_dq_float16,
);

/// Largest `|y - x @ W^T|` over the outputs, in units of `2^-8 * (sum_k |x_k w_k| + |y|)`.
fn worst_matmul_error(x: &[f32], w: &[f32], y: &[f32], k: usize) -> f64 {
    let (rows, out) = (x.len() / k, w.len() / k);
    let mut worst = 0.0f64;
    for i in 0..rows {
        for j in 0..out {
            let terms = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64);
            let exact: f64 = terms.clone().sum();
            let magnitude: f64 = terms.map(f64::abs).sum::<f64>() + exact.abs();
            let err = (y[i * out + j] as f64 - exact).abs();
            worst = worst.max(err / (magnitude * 2f64.powi(-8)));
        }
    }
    worst
}

/// `bnb.matmul_4bit(x, W^T)` with W nf4 / double quant / blocksize 64 in bf16 is `x @
/// dequant(W)^T` up to bf16 arithmetic. Tolerance: one bf16 rounding (unit roundoff 2^-8) of
/// every product term and of the output, `2^-8 * (sum_k |x_k w_k| + |y|)`. bitsandbytes' bf16
/// path is visibly coarser than one rounding of an f32-accumulated sum (errors reach 43 bf16
/// ulps of y, about 0.36 of this bound), so a tighter output-only bound would not hold; the
/// bound still rejects the unquantized weight, whose product is off by far more.
#[test]
fn matmul_nf4_dq_bs64_matches_dequantized_weight() {
    let (x_shape, x) = f32_tensor("matmul.x_bf16");
    let (y_shape, y) = f32_tensor("matmul.y_nf4_dq_bs64");
    let (w_shape, w) = f32_tensor("input_f32");
    assert_eq!(w_shape[1], x_shape[1]);
    assert_eq!(y_shape, [x_shape[0], w_shape[0]]);
    let w_bf16 = cast_f32(&w, DType::BF16).unwrap();
    let q = quantize_4bit(w_bf16.as_slice(), &w_shape, QuantType::Nf4, 64, true).unwrap();
    let dequantized = dequantize_4bit(&q).unwrap();
    let worst = worst_matmul_error(&x, &dequantized, &y, x_shape[1]);
    eprintln!("worst error / tolerance: {worst:.3}");
    assert!(
        worst <= 1.0,
        "x @ dequant(W)^T is off by {worst} tolerances"
    );
    let unquantized = worst_matmul_error(&x, &w, &y, x_shape[1]);
    assert!(
        unquantized > 1.0,
        "the tolerance cannot tell quantized from unquantized"
    );
}
