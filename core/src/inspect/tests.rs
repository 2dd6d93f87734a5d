//! Known cases checked by value. Run with `--nocapture` to see the figures.

use super::stats::{measure, reconstruct};
use super::*;
use crate::quant::{dequantize_4bit, quantize_4bit, FloatSlice, QuantType};

/// Seeded N(0, std²) samples: SplitMix64 and Box–Muller, so the test needs no RNG crate.
fn gaussian(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        // 53 random bits in (0, 1].
        (((z ^ (z >> 31)) >> 11) + 1) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32 * std
        })
        .collect()
}

fn config(quant_type: QuantType, blocksize: usize, double_quant: bool) -> QuantConfig {
    QuantConfig {
        quant_type,
        blocksize,
        double_quant,
    }
}

fn summary(report: &TensorReport, c: QuantConfig) -> &ErrorSummary {
    &report
        .configs
        .iter()
        .find(|d| d.summary.config == c)
        .expect("config inspected")
        .summary
}

const GAUSS_SHAPE: [usize; 2] = [64, 4096];
const GAUSS_STD: f32 = 0.02;

#[test]
fn gaussian_nf4_beats_fp4_and_the_figures_agree() {
    let w = gaussian(64 * 4096, GAUSS_STD, 7);
    let configs = quant_configs(&DEFAULT_BLOCKSIZES);
    assert_eq!(configs.len(), 12);
    let report = inspect_tensor("gauss", FloatSlice::F32(&w), &GAUSS_SHAPE, &configs, 101).unwrap();
    for d in &report.configs {
        let s = &d.summary;
        println!(
            "{:12} mse {:.4e} max|e| {:.4e} mean|e| {:.4e} sqnr {:.3} dB  block rel p50 {:.4} p99 {:.4}",
            s.config.label(),
            s.mse,
            s.max_abs_error,
            s.mean_abs_error,
            s.sqnr.db(),
            s.block_rel_error.unwrap().p50,
            s.block_rel_error.unwrap().p99
        );
        // SQNR is the signal power over the MSE, and the signal power is the variance.
        assert!((s.sqnr.db() - 10.0 * (s.mean_square_weight / s.mse).log10()).abs() < 1e-9);
        assert!((s.mean_square_weight / (GAUSS_STD as f64).powi(2) - 1.0).abs() < 0.01);
        assert!(s.mean_abs_error <= s.mse.sqrt() && s.mse.sqrt() <= s.max_abs_error);
        assert_eq!((s.blocks, s.zero_blocks), (w.len() / s.config.blocksize, 0));
        assert_eq!(d.error_histogram.total(), w.len() as u64);
        assert_eq!(d.error_histogram.outside, 0);
        assert_eq!(d.block_rel_error_histogram.total(), s.blocks as u64);
    }
    assert_eq!(report.weight_histogram.total(), w.len() as u64);
    for &bs in &DEFAULT_BLOCKSIZES {
        for dq in [false, true] {
            let nf4 = summary(&report, config(QuantType::Nf4, bs, dq)).sqnr.db();
            let fp4 = summary(&report, config(QuantType::Fp4, bs, dq)).sqnr.db();
            println!("bs{bs} dq {dq}: NF4 - FP4 = {:.3} dB", nf4 - fp4);
            // NF4's levels are the normal quantiles; FP4 wastes a level on its tiny subnormal
            // and spaces the large ones coarsely: about 2.5 dB apart on Gaussian weights
            // (measured 2.45, 2.58, 2.70 dB at blocks of 64, 128, 256).
            assert!(
                (2.0..3.2).contains(&(nf4 - fp4)),
                "bs{bs} dq {dq}: {nf4} vs {fp4}"
            );
            // NF4 on Gaussian blocks of 64..256: roughly 19–21 dB.
            assert!((18.0..22.0).contains(&nf4), "bs{bs} dq {dq}: NF4 {nf4}");
        }
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let plain = summary(&report, config(qt, bs, false)).sqnr.db();
            let double = summary(&report, config(qt, bs, true)).sqnr.db();
            println!(
                "{qt} bs{bs}: double quant changes SQNR by {:.5} dB",
                double - plain
            );
            assert!(
                (double - plain).abs() < 0.05,
                "{qt} bs{bs}: {plain} vs {double}"
            );
        }
    }
    // A larger block has a larger absmax, hence coarser levels for the bulk of the weights.
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let db = |bs| summary(&report, config(qt, bs, false)).sqnr.db();
        assert!(db(64) > db(128) && db(128) > db(256), "{qt}");
    }
    // The code levels scale with the median absmax of blocks of 64 Gaussians (≈ 2.4 σ).
    let nf4_64 = &report.configs[0];
    assert_eq!(nf4_64.summary.config, config(QuantType::Nf4, 64, false));
    let scale_in_std = nf4_64.code_scale / GAUSS_STD as f64;
    assert!((2.2..2.7).contains(&scale_in_std), "{scale_in_std}");
    assert_eq!(nf4_64.code_levels[15], nf4_64.code_scale);
    assert_eq!(nf4_64.code_levels[0], -nf4_64.code_scale);
}

#[test]
fn relative_error_of_outlier_blocks() {
    let mut w = gaussian(64 * 4096, GAUSS_STD, 11);
    // One weight of eight blocks of 64 (spread over the tensor) becomes ±50 σ.
    let outlier_blocks: Vec<usize> = (0..8).map(|i| 17 + i * 509).collect();
    for &b in &outlier_blocks {
        let i = b * 64 + 5;
        w[i] = 50.0 * GAUSS_STD * w[i].signum();
    }
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let c = config(qt, 64, false);
        let (s, rel) = measure(
            &w,
            &reconstruct(FloatSlice::F32(&w), &GAUSS_SHAPE, c).unwrap(),
            c,
        );
        let q = s.block_rel_error.unwrap();
        let mut by_error: Vec<usize> = (0..rel.len()).collect();
        by_error.sort_by(|&a, &b| rel[b].total_cmp(&rel[a]));
        let top = &by_error[..outlier_blocks.len()];
        // The outlier sets the block's absmax to 50 σ, so the other 63 weights fall into the
        // codes around zero: the block's error is about the norm of those weights.
        let collapse: Vec<f64> = outlier_blocks
            .iter()
            .map(|&b| {
                let block = &w[b * 64..(b + 1) * 64];
                let rest: Vec<f32> = block
                    .iter()
                    .copied()
                    .filter(|x| x.abs() < 40.0 * GAUSS_STD)
                    .collect();
                rel[b] / (norm(&rest) / norm(block))
            })
            .collect();
        let outlier_rel: Vec<f64> = outlier_blocks.iter().map(|&b| rel[b]).collect();
        println!(
            "{qt}: block rel error p50 {:.4} p90 {:.4} p99 {:.4} max {:.4}; outlier blocks {:.4?}; \
             over ‖rest‖/‖block‖ {:.3?}; outlier blocks among the top 8: {}; sqnr {:.2} dB",
            q.p50,
            q.p90,
            q.p99,
            q.max,
            outlier_rel,
            collapse,
            top.iter().filter(|b| outlier_blocks.contains(b)).count(),
            s.sqnr.db()
        );
        for r in &collapse {
            assert!((0.75..=1.0 + 1e-12).contains(r), "{qt}: {collapse:?}");
        }
        if qt == QuantType::Nf4 {
            // NF4's error on Gaussian blocks is ~0.09 of their norm, below the ~0.13 left in
            // an outlier block: the eight largest relative errors are the outlier blocks.
            let mut top = top.to_vec();
            top.sort_unstable();
            assert_eq!(top, outlier_blocks);
            assert!(outlier_rel.iter().all(|&r| r > q.p99));
        }
    }
}

#[test]
fn all_zero_blocks_are_counted_apart() {
    // Four blocks of 64, the third all zero.
    let mut w = gaussian(256, 1.0, 3);
    w[128..192].fill(0.0);
    let configs = quant_configs(&[64]);
    let report = inspect_tensor("z", FloatSlice::F32(&w), &[4, 64], &configs, 11).unwrap();
    for d in &report.configs {
        let s = &d.summary;
        assert_eq!((s.blocks, s.zero_blocks), (4, 1), "{}", s.config.label());
        assert_eq!(d.block_rel_error_histogram.total(), 3);
        let deq = dequantize_4bit(
            &quantize_4bit(
                FloatSlice::F32(&w),
                &[256],
                s.config.quant_type,
                64,
                s.config.double_quant,
            )
            .unwrap(),
        )
        .unwrap();
        let zero_block_error = deq[128..192].iter().map(|d| d.abs()).fold(0.0f32, f32::max);
        println!(
            "{}: |ŵ| in the zero block up to {zero_block_error:e}",
            s.config.label()
        );
        // The kernel gives an all-zero block absmax 0 and code 0: exact without double quant.
        // With double quant that absmax comes back as (nearly) 0 plus the nested offset's
        // rounding, and NF4's code 0 is -1: the zero block then reconstructs to -absmax'.
        if !s.config.double_quant || s.config.quant_type == QuantType::Fp4 {
            assert_eq!(zero_block_error, 0.0, "{}", s.config.label());
        } else {
            let block = &deq[128..192];
            assert!(block.iter().all(|&d| d == block[0] && d < 0.0), "{block:?}");
        }
    }
    let zeros = vec![0.0f32; 128];
    let s = summarize_tensor(
        "zeros",
        FloatSlice::F32(&zeros),
        &[128],
        &[config(QuantType::Nf4, 64, false)],
    )
    .unwrap();
    let s = &s.configs[0];
    assert_eq!(
        (s.sqnr, s.zero_blocks, s.block_rel_error),
        (Sqnr::NoSignal, 2, None)
    );
    assert_eq!((s.mse, s.max_abs_error), (0.0, 0.0));
}

#[test]
fn tiny_case_by_hand() {
    // One (partial) block of 32; absmax 1, so each value goes to its nearest NF4 code.
    let w = [1.0f32, -0.5, 0.25, 0.1, 0.0, -1.0, 0.7, 0.3];
    // Nearest codes, read off the NF4 table: -0.5 is below the midpoint of -0.5251 and
    // -0.3949 (-0.4600), so it takes -0.5251; 0.1 is below that of 0.0796 and 0.1609 (0.1203);
    // 0.3 is above that of 0.2461 and 0.3379 (0.2920); 0.7 above that of 0.5626 and 0.7230.
    let codes = [
        1.0f64,
        -0.5250730514526367,
        0.24611230194568634,
        0.07958029955625534,
        0.0,
        -1.0,
        0.7229568362236023,
        0.33791524171829224,
    ];
    let errors: Vec<f64> = w
        .iter()
        .zip(codes)
        .map(|(&w, c)| w as f64 - c as f32 as f64)
        .collect();
    let mse = errors.iter().map(|e| e * e).sum::<f64>() / 8.0;
    let max = errors.iter().map(|e| e.abs()).fold(0.0, f64::max);
    // By hand: errors 0, .0251, .0039, .0204, 0, 0, -.0230, -.0379 → max .0379 (at 0.3),
    // MSE (.0251² + .0039² + .0204² + .0230² + .0379²) / 8 ≈ 3.78e-4.
    assert!(
        (max - 0.0379).abs() < 1e-4 && (mse - 3.78e-4).abs() < 0.01e-4,
        "{max} {mse}"
    );

    let c = config(QuantType::Nf4, 32, false);
    let deq = dequantize_4bit(
        &quantize_4bit(FloatSlice::F32(&w), &[8], c.quant_type, 32, false).unwrap(),
    )
    .unwrap();
    assert_eq!(
        deq,
        codes.map(|c| c as f32),
        "dequantize_4bit takes the nearest codes"
    );
    let report = inspect_tensor("tiny", FloatSlice::F32(&w), &[8], &[c], 5).unwrap();
    let d = &report.configs[0];
    let s = &d.summary;
    assert_eq!(s.max_abs_error, max);
    assert!((s.mse - mse).abs() <= 1e-18, "{} {mse}", s.mse);
    let signal = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
    assert_eq!(s.sqnr, Sqnr::Db(10.0 * (signal / (mse * 8.0)).log10()));
    assert_eq!((s.blocks, s.zero_blocks), (1, 0));
    assert_eq!(d.code_scale, 1.0);
    // Errors over [-.0379, .0379] in 5 bins of width .0152: -.0379 and -.0230 in the first,
    // the three zeros and .0039 in the middle, .0204 in the fourth, .0251 in the last.
    assert_eq!(d.error_histogram.counts, vec![2, 0, 4, 1, 1]);
    assert_eq!(report.weights.absmax, 1.0);
    // Weights over [-1, 1] in bins of 0.4.
    assert_eq!(report.weight_histogram.counts, vec![1, 1, 2, 2, 2]);
}

#[test]
fn non_finite_input_and_bad_shapes_are_errors() {
    let mut w = vec![0.5f32; 64];
    w[9] = f32::NAN;
    let err =
        inspect_tensor("x", FloatSlice::F32(&w), &[64], &quant_configs(&[64]), 10).unwrap_err();
    assert!(err.to_string().contains("index 9"), "{err}");
    let ok = vec![0.5f32; 64];
    assert!(summarize_tensor("x", FloatSlice::F32(&ok), &[65], &quant_configs(&[64])).is_err());
    assert!(summarize_tensor("x", FloatSlice::F32(&ok), &[64], &quant_configs(&[48])).is_err());
}

#[test]
fn model_report_heat_maps_and_json() {
    let configs = quant_configs(&[64]);
    let names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ];
    let tensors: Vec<TensorSummary> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let w = gaussian(128, 0.02 * (i + 1) as f32, i as u64);
            summarize_tensor(name, FloatSlice::F32(&w), &[2, 64], &configs).unwrap()
        })
        .collect();
    assert_eq!(
        tensors[1].location,
        LinearLocation {
            layer: Some(0),
            module: "up_proj".into()
        }
    );
    let report = ModelReport::new(configs.clone(), tensors.clone());
    let map = &report.heat_maps[1];
    assert_eq!(map.config, configs[1]);
    assert_eq!(
        (map.layers.clone(), map.modules.clone()),
        (vec![0, 1], vec!["q_proj".into(), "up_proj".into()])
    );
    assert_eq!(map.sqnr[1][0], Some(tensors[2].configs[1].sqnr));
    assert_eq!(map.sqnr[1][1], None);
    // Totals weigh each tensor by its size: between the best and worst tensor.
    let total = report.totals[0].sqnr.db();
    let dbs: Vec<f64> = tensors.iter().map(|t| t.configs[0].sqnr.db()).collect();
    assert!(dbs.iter().any(|&d| d <= total) && dbs.iter().any(|&d| d >= total));

    let doc = InspectReport::Model(report);
    let json = serde_json::to_value(&doc).unwrap();
    assert_eq!(json["kind"], "model");
    assert_eq!(json["configs"][1]["quant_type"], "fp4");
    assert_eq!(json["tensors"][0]["layer"], 0);
    assert!(json["tensors"][0]["configs"][0]["sqnr"]["db"].is_f64());
    assert_eq!(serde_json::to_value(Sqnr::Lossless).unwrap(), "lossless");
    let back: InspectReport = serde_json::from_value(json).unwrap();
    assert_eq!(back, doc);
}
