//! Each kernel against a CPU reference on random inputs, on the machine's WebGPU adapter
//! (lavapipe in CI); skipped, with the reason printed, only where there is none.

use qlora_core::quant::{cast_f32, dequantize_4bit, quantize_4bit, FloatData, QuantType};
use qlora_core::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::block_on;
use crate::buffers::{scratch, submit_and_read, upload, upload_f32, Dense};
use crate::device::{request_adapter, Engine, EngineOptions};
use crate::kernels::{
    AttnParams, LinearParams, NormParams, Recorder, SampleParams, StepBuffer, WeightBinding,
    ACCUMULATE, HAS_BIAS,
};
use crate::weights::upload_q4;

/// An engine on the machine's adapter. Tests run one at a time (a lock): lavapipe crashes
/// when several devices work at once in one process.
fn engine() -> Option<(Engine, std::sync::MutexGuard<'static, ()>)> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(adapter) = block_on(request_adapter()) else {
        eprintln!("skipped: no WebGPU adapter (install mesa-vulkan-drivers for lavapipe)");
        return None;
    };
    let engine = block_on(Engine::from_adapter(&adapter, EngineOptions::default())).unwrap();
    Some((engine, guard))
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn read(rec: Recorder, buffer: &wgpu::Buffer, count: usize) -> Vec<f32> {
    let engine = rec.engine.clone();
    let bytes = block_on(submit_and_read(
        &engine,
        rec.into_encoder(),
        buffer,
        (count * 4) as u64,
    ))
    .unwrap();
    bytemuck::pod_collect_to_vec(&bytes)
}

fn assert_close(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let max_ref = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance * max_ref,
            "{what}[{i}]: {g} vs {w} (scale {max_ref})"
        );
    }
}

#[test]
fn dequantization_equals_the_cpu_bit_for_bit() {
    let Some((engine, _one_at_a_time)) = engine() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(1);
    // 37 x 71: an odd element count (the last byte half used) and partial last blocks; 600
    // blocks of 64 make three nested groups of 256. Magnitudes of 1e-3 put FP4's smallest
    // codes times absmax among f16's subnormals.
    let cases: [(&[usize], f32); 3] = [(&[37, 71], 3.0), (&[600, 64], 3.0), (&[37, 71], 1e-3)];
    for (shape, scale) in cases {
        let numel: usize = shape.iter().product();
        let mut values = random(&mut rng, numel, scale);
        values[5] = 0.0;
        values[64..128].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let data = cast_f32(&values, dtype).unwrap();
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                for double_quant in [false, true] {
                    for blocksize in [64, 128] {
                        let q = quantize_4bit(data.as_slice(), shape, qt, blocksize, double_quant)
                            .unwrap();
                        let want = dequantize_4bit(&q).unwrap();
                        let got = block_on(engine.dequantize_4bit(&q)).unwrap();
                        let what =
                            format!("{shape:?} {dtype} {qt} dq={double_quant} bs={blocksize}");
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(g == w, "{what}[{i}]: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }
}

/// `y = x Wᵀ` in f64 for `x` [rows, k], `w` [n, k].
fn reference_linear(x: &[f32], w: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * n];
    for r in 0..rows {
        for j in 0..n {
            y[r * n + j] = (0..k)
                .map(|i| f64::from(x[r * k + i]) * f64::from(w[j * k + i]))
                .sum::<f64>() as f32;
        }
    }
    y
}

/// One 4-bit weight case: its shape, block size, the dtype it was quantized from and the scale
/// of its values (a tiny one gives blocks whose products flush to zero).
struct Q4Case {
    n: usize,
    k: usize,
    blocksize: usize,
    dtype: DType,
    scale: f32,
}

#[test]
fn four_bit_matvec_and_tiled_matmul_equal_the_dequantized_product() {
    let Some((engine, _one_at_a_time)) = engine() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(2);
    let case = |n, k, blocksize, dtype, scale| Q4Case {
        n,
        k,
        blocksize,
        dtype,
        scale,
    };
    let cases = [
        // Rows of whole 32-code loads (the matvec's wide path; with 2112, lanes with two loads
        // in flight and a last single one) and rows that are not.
        case(45, 192, 64, DType::F32, 1.0),
        case(21, 2112, 64, DType::F32, 1.0),
        case(13, 190, 64, DType::F32, 1.0),
        case(11, 1024, 256, DType::F32, 1.0),
        // Values rounded to the source dtype, and absmax too small for the factored sum.
        case(9, 2112, 64, DType::BF16, 1.0),
        case(9, 640, 128, DType::F16, 1.0),
        case(9, 640, 64, DType::F32, 1e-37),
    ];
    for c in cases {
        let (n, k) = (c.n, c.k);
        let w = random(&mut rng, n * k, c.scale);
        let bias = random(&mut rng, n, 1.0);
        let source = cast_f32(&w, c.dtype).unwrap();
        for (qt, dq) in [(QuantType::Nf4, true), (QuantType::Fp4, false)] {
            let q = quantize_4bit(source.as_slice(), &[n, k], qt, c.blocksize, dq).unwrap();
            let dense = dequantize_4bit(&q).unwrap();
            let (buffer, params) = upload_q4(&engine, "w", &q).unwrap();
            // One row (the matrix-vector kernel) and 19 (tiles with ragged edges). With tiny
            // weights, x is large and y starts at zero, so that the product is what is compared.
            let tiny = c.scale < 1.0;
            for rows in [1, 19] {
                let x = random(&mut rng, rows * k, if tiny { 1e30 } else { 1.0 });
                let start = if tiny {
                    vec![0.0; rows * n]
                } else {
                    random(&mut rng, rows * n, 1.0)
                };
                let bias = if tiny { vec![0.0; n] } else { bias.clone() };
                let xb = upload_f32(&engine, "x", &x).unwrap();
                let yb = upload_f32(&engine, "y", &start).unwrap();
                let bb = upload_f32(&engine, "bias", &bias).unwrap();
                let mut rec = Recorder::new(&engine);
                let p = LinearParams {
                    rows: rows as u32,
                    n: n as u32,
                    k: k as u32,
                    x_stride: k as u32,
                    y_stride: n as u32,
                    y_offset: 0,
                    flags: ACCUMULATE | HAS_BIAS,
                    scale: 0.5,
                    ..Default::default()
                };
                rec.linear(&p, &xb, &yb, Some(&bb), WeightBinding::Q4(&buffer, &params));
                let got = read(rec, &yb, rows * n);
                let product = reference_linear(&x, &dense, rows, n, k);
                let want: Vec<f32> = (0..rows * n)
                    .map(|i| start[i] + (0.5 * product[i] + bias[i % n]))
                    .collect();
                assert!(
                    want.iter().any(|&v| v != 0.0),
                    "a product that is not all zeros"
                );
                assert_close(
                    &got,
                    &want,
                    1e-5,
                    &format!(
                        "{qt} dq={dq} rows={rows} n={n} k={k} blocksize={} from {} scale {}",
                        c.blocksize, c.dtype, c.scale
                    ),
                );
            }
        }
    }
}

#[test]
fn dense_matvec_of_f32_f16_and_bf16_equals_the_widened_product() {
    let Some((engine, _one_at_a_time)) = engine() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(7);
    // Rows of whole 16-byte loads (two in flight, then a last one) and rows that are not.
    for (n, k) in [(19, 528), (9, 33), (5, 8)] {
        let w = random(&mut rng, n * k, 1.0);
        let x = random(&mut rng, k, 1.0);
        let start = random(&mut rng, 3 + n, 1.0);
        for (dtype, dense) in [
            (DType::F32, Dense::F32),
            (DType::F16, Dense::F16),
            (DType::BF16, Dense::Bf16),
        ] {
            let (bytes, widened): (Vec<u8>, Vec<f32>) = match cast_f32(&w, dtype).unwrap() {
                FloatData::F32(v) => (bytemuck::cast_slice(&v).to_vec(), v.to_vec()),
                FloatData::F16(v) => (
                    bytemuck::cast_slice(&v).to_vec(),
                    v.iter().map(|h| h.to_f32()).collect(),
                ),
                FloatData::BF16(v) => (
                    bytemuck::cast_slice(&v).to_vec(),
                    v.iter().map(|h| h.to_f32()).collect(),
                ),
            };
            let wb = upload(&engine, "w", &bytes).unwrap();
            let xb = upload_f32(&engine, "x", &x).unwrap();
            let yb = upload_f32(&engine, "y", &start).unwrap();
            let mut rec = Recorder::new(&engine);
            // Accumulated into columns 3 .. 3 + n of y.
            let p = LinearParams {
                rows: 1,
                n: n as u32,
                k: k as u32,
                x_stride: k as u32,
                y_stride: (3 + n) as u32,
                y_offset: 3,
                flags: ACCUMULATE,
                scale: 2.0,
                ..Default::default()
            };
            rec.linear(&p, &xb, &yb, None, WeightBinding::Dense(&wb, dense));
            let got = read(rec, &yb, 3 + n);
            let product = reference_linear(&x, &widened, 1, n, k);
            let want: Vec<f32> = (0..3 + n)
                .map(|i| start[i] + if i < 3 { 0.0 } else { 2.0 * product[i - 3] })
                .collect();
            assert_close(&got, &want, 1e-5, &format!("{dtype} n={n} k={k}"));
        }
    }
}

#[test]
fn f32_linear_writes_its_column_slice() {
    let Some((engine, _one_at_a_time)) = engine() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(3);
    let (rows, n, k, width, offset) = (3, 10, 33, 25, 7);
    let w = random(&mut rng, n * k, 1.0);
    let x = random(&mut rng, rows * k, 1.0);
    let wb = upload_f32(&engine, "w", &w).unwrap();
    let xb = upload_f32(&engine, "x", &x).unwrap();
    let yb = upload_f32(&engine, "y", &vec![7.0; rows * width]).unwrap();
    let mut rec = Recorder::new(&engine);
    let p = LinearParams {
        rows: rows as u32,
        n: n as u32,
        k: k as u32,
        x_stride: k as u32,
        y_stride: width as u32,
        y_offset: offset as u32,
        scale: 1.0,
        ..Default::default()
    };
    rec.linear(&p, &xb, &yb, None, WeightBinding::Dense(&wb, Dense::F32));
    let unpacked = scratch(&engine, "w", n * k).unwrap();
    rec.unpack(&p, &unpacked, WeightBinding::Dense(&wb, Dense::F32));
    let got = read(rec, &yb, rows * width);
    let product = reference_linear(&x, &w, rows, n, k);
    for r in 0..rows {
        for c in 0..width {
            let want = if (offset..offset + n).contains(&c) {
                product[r * n + c - offset]
            } else {
                7.0
            };
            assert!((got[r * width + c] - want).abs() <= 1e-5, "[{r}, {c}]");
        }
    }
    assert_eq!(read(Recorder::new(&engine), &unpacked, n * k), w);
}

#[test]
fn layer_norm_and_rms_norm_match_their_definitions() {
    let Some((engine, _one_at_a_time)) = engine() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(4);
    let (rows, dim, eps) = (5, 150, 1e-5f32);
    let x: Vec<f32> = random(&mut rng, rows * dim, 2.0)
        .iter()
        .map(|v| v + 0.7)
        .collect();
    let weight = random(&mut rng, dim, 1.5);
    let bias = random(&mut rng, dim, 0.5);
    let (xb, wb, bb) = (
        upload_f32(&engine, "x", &x).unwrap(),
        upload_f32(&engine, "w", &weight).unwrap(),
        upload_f32(&engine, "b", &bias).unwrap(),
    );
    let mut want_ln = Vec::new();
    let mut want_rms = Vec::new();
    for row in x.chunks(dim) {
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / dim as f64;
        let var = row
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / dim as f64;
        let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / dim as f64;
        for (i, &v) in row.iter().enumerate() {
            let v = f64::from(v);
            want_ln.push(
                ((v - mean) / (var + f64::from(eps)).sqrt() * f64::from(weight[i])
                    + f64::from(bias[i])) as f32,
            );
            want_rms.push((v / (ms + f64::from(eps)).sqrt() * f64::from(weight[i])) as f32);
        }
    }
    for (bias, want) in [(Some(&bb), want_ln), (None, want_rms)] {
        let y = scratch(&engine, "y", rows * dim).unwrap();
        let mut rec = Recorder::new(&engine);
        let params = NormParams {
            dim: dim as u32,
            eps,
        };
        rec.norm(rows, &params, &xb, &y, &wb, bias);
        assert_close(&read(rec, &y, rows * dim), &want, 1e-5, "norm");
    }
}

#[test]
fn gelu_and_gated_silu_match_their_definitions() {
    let Some((engine, _one_at_a_time)) = engine() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(5);
    let n = 1000;
    let mut a = random(&mut rng, n, 6.0);
    a[0] = 40.0; // tanh saturates without overflow
    a[1] = -40.0;
    let b = random(&mut rng, n, 2.0);
    let gelu: Vec<f32> = a
        .iter()
        .map(|&x| {
            let x = f64::from(x);
            (x * 0.5 * (1.0 + (0.79788456 * x * (1.0 + 0.044715 * x * x)).tanh())) as f32
        })
        .collect();
    let silu: Vec<f32> = a
        .iter()
        .zip(&b)
        .map(|(&g, &u)| (f64::from(g) / (1.0 + (-f64::from(g)).exp()) * f64::from(u)) as f32)
        .collect();
    let ab = upload_f32(&engine, "a", &a).unwrap();
    let mut rec = Recorder::new(&engine);
    rec.gelu_tanh(n, &ab);
    assert_close(&read(rec, &ab, n), &gelu, 1e-6, "gelu");
    let ab = upload_f32(&engine, "a", &a).unwrap();
    let bb = upload_f32(&engine, "b", &b).unwrap();
    let mut rec = Recorder::new(&engine);
    rec.silu_mul(n, &ab, &bb);
    assert_close(&read(rec, &ab, n), &silu, 1e-6, "silu");
}

/// Attention of `t` new tokens after `past` cached ones, in f64: q [t, heads, d], keys and values
/// [s, kv_heads, d]; RoPE already applied.
#[allow(clippy::too_many_arguments)]
fn reference_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    kv_heads: usize,
    d: usize,
    past: usize,
    slopes: Option<&[f32]>,
) -> Vec<f32> {
    let t = q.len() / (heads * d);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; t * heads * d];
    for row in 0..t {
        for h in 0..heads {
            let kv = h / (heads / kv_heads);
            let keys = past + row + 1;
            let scores: Vec<f64> = (0..keys)
                .map(|j| {
                    let dot: f64 = (0..d)
                        .map(|c| {
                            f64::from(q[(row * heads + h) * d + c])
                                * f64::from(k[(j * kv_heads + kv) * d + c])
                        })
                        .sum();
                    dot * scale + slopes.map_or(0.0, |s| f64::from(s[h]) * j as f64)
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..d {
                out[(row * heads + h) * d + c] = (0..keys)
                    .map(|j| e[j] / z * f64::from(v[(j * kv_heads + kv) * d + c]))
                    .sum::<f64>() as f32;
            }
        }
    }
    out
}

/// RoPE of `x` [t, heads, d] at positions past.., pairs (j, j + d/2) or (2j, 2j + 1).
fn reference_rope(
    x: &[f32],
    heads: usize,
    d: usize,
    past: usize,
    cos: &[f32],
    sin: &[f32],
    adjacent: bool,
) -> Vec<f32> {
    let mut out = x.to_vec();
    let half = d / 2;
    for (i, head) in x.chunks(d).enumerate() {
        let pos = past + i / heads;
        for j in 0..half {
            let (a, b) = if adjacent {
                (2 * j, 2 * j + 1)
            } else {
                (j, j + half)
            };
            let (c, s) = (cos[pos * half + j], sin[pos * half + j]);
            out[i * d + a] = head[a] * c - head[b] * s;
            out[i * d + b] = head[b] * c + head[a] * s;
        }
    }
    out
}

#[test]
fn rope_cache_and_attention_match_the_reference() {
    let Some((engine, _one_at_a_time)) = engine() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(6);
    let (heads, kv_heads, d, max_seq) = (6, 2, 8, 40);
    let half = d / 2;
    let cos = random(&mut rng, max_seq * half, 1.0);
    let sin = random(&mut rng, max_seq * half, 1.0);
    let slopes = random(&mut rng, heads, 0.5);
    for (adjacent, alibi) in [(false, false), (true, false), (false, true)] {
        let k_cache = scratch(&engine, "k", max_seq * kv_heads * d).unwrap();
        let v_cache = scratch(&engine, "v", max_seq * kv_heads * d).unwrap();
        let (cosb, sinb, slopeb) = (
            upload_f32(&engine, "cos", &cos).unwrap(),
            upload_f32(&engine, "sin", &sin).unwrap(),
            upload_f32(&engine, "slopes", &slopes).unwrap(),
        );
        let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
        let mut past = 0;
        // A prompt of 7, then two single tokens: the cache grows across steps.
        for t in [7, 1, 1] {
            let q = random(&mut rng, t * heads * d, 1.0);
            let k = random(&mut rng, t * kv_heads * d, 1.0);
            let v = random(&mut rng, t * kv_heads * d, 1.0);
            let (qb, kb, vb) = (
                upload_f32(&engine, "q", &q).unwrap(),
                upload_f32(&engine, "k", &k).unwrap(),
                upload_f32(&engine, "v", &v).unwrap(),
            );
            let scores = scratch(&engine, "scores", t * heads * max_seq).unwrap();
            let context = scratch(&engine, "context", t * heads * d).unwrap();
            let attn = AttnParams {
                heads: heads as u32,
                kv_heads: kv_heads as u32,
                head_dim: d as u32,
                t: t as u32,
                max_seq: max_seq as u32,
                row_stride: (heads * d) as u32,
                head_stride: d as u32,
                rope_adjacent: u32::from(adjacent),
                alibi: u32::from(alibi),
                scale: (1.0 / (d as f64).sqrt()) as f32,
                ..Default::default()
            };
            let kv = AttnParams {
                heads: kv_heads as u32,
                row_stride: (kv_heads * d) as u32,
                ..attn
            };
            let step = StepBuffer::new(&engine, t).unwrap();
            step.write(&engine, past, &[]);
            let mut rec = Recorder::new(&engine);
            let (q, k) = if alibi {
                (q, k)
            } else {
                rec.rope(&attn, &step, &qb, &cosb, &sinb);
                rec.rope(&kv, &step, &kb, &cosb, &sinb);
                (
                    reference_rope(&q, heads, d, past, &cos, &sin, adjacent),
                    reference_rope(&k, kv_heads, d, past, &cos, &sin, adjacent),
                )
            };
            rec.kv_append(&kv, &step, &kb, &vb, &k_cache, &v_cache);
            rec.attention(
                &attn, &step, &qb, &k_cache, &v_cache, &slopeb, &scores, &context,
            );
            all_k.extend(k);
            all_v.extend(v);
            let got = read(rec, &context, t * heads * d);
            let want = reference_attention(
                &q,
                &all_k,
                &all_v,
                heads,
                kv_heads,
                d,
                past,
                alibi.then_some(&slopes[..]),
            );
            assert_close(
                &got,
                &want,
                1e-5,
                &format!("adjacent={adjacent} alibi={alibi} past={past}"),
            );
            past += t;
        }
    }
}

#[test]
fn argmax_sampling_and_penalty_choose_as_the_cpu_would() {
    let Some((engine, _one_at_a_time)) = engine() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(7);
    let n = 3000;
    let token = scratch(&engine, "token", 1).unwrap();
    let ids = upload(&engine, "ids", bytemuck::cast_slice(&[5u32, 9, 2999])).unwrap();
    let params = |context_len, top_k, temperature, top_p, u| SampleParams {
        n: n as u32,
        context_len,
        top_k,
        temperature,
        top_p,
        penalty: 2.0,
        u,
    };
    let choose = |logits: &[f32], p: SampleParams, greedy: bool, penalize: bool| -> u32 {
        let lb = upload_f32(&engine, "logits", logits).unwrap();
        let mut rec = Recorder::new(&engine);
        if penalize {
            rec.repetition_penalty(&p, &lb, &ids);
        }
        rec.choose(&p, greedy, &lb, &token);
        let bytes = block_on(submit_and_read(&engine, rec.into_encoder(), &token, 4)).unwrap();
        u32::from_le_bytes(bytes[..4].try_into().unwrap())
    };
    let mut logits = random(&mut rng, n, 3.0);
    logits[1234] = 10.0;
    logits[2345] = 10.0; // a tie: the first index wins
    assert_eq!(
        choose(&logits, params(0, 0, 1.0, 1.0, 0.0), true, false),
        1234
    );
    // The penalty halves both maxima's competitor below a boosted penalized id.
    logits[9] = 30.0;
    logits[5] = -30.0;
    assert_eq!(choose(&logits, params(3, 0, 1.0, 1.0, 0.0), true, true), 9);
    logits[9] = 19.0; // 19 / 2 < 10
    assert_eq!(
        choose(&logits, params(3, 0, 1.0, 1.0, 0.0), true, true),
        1234
    );
    // Sampling: top-k 1 and a tiny top-p keep only the most likely token, whatever u is.
    let mut peaked = random(&mut rng, n, 1.0);
    peaked[777] = 5.0;
    for u in [0.0, 0.5, 0.999] {
        assert_eq!(
            choose(&peaked, params(0, 1, 1.0, 1.0, u), false, false),
            777
        );
        assert_eq!(
            choose(&peaked, params(0, 0, 1.0, 0.01, u), false, false),
            777
        );
    }
    // Three tokens of probability 0.5, 0.3, 0.2 (the rest -inf-like): u picks by cumulative
    // interval, and top-p 0.6 keeps the first two.
    let mut three = vec![-1e30f32; n];
    three[10] = 0.5f32.ln();
    three[20] = 0.3f32.ln();
    three[30] = 0.2f32.ln();
    for (u, want) in [(0.1, 10), (0.6, 20), (0.9, 30)] {
        assert_eq!(
            choose(&three, params(0, 0, 1.0, 1.0, u), false, false),
            want,
            "u={u}"
        );
    }
    // top-p 0.6 keeps 0.8 of mass: u 0.7 * 0.8 = 0.56 > 0.5 lands on the second.
    assert_eq!(
        choose(&three, params(0, 0, 1.0, 0.6, 0.7), false, false),
        20
    );
    assert_eq!(
        choose(&three, params(0, 0, 1.0, 0.6, 0.99), false, false),
        20
    );
}

#[test]
fn rejected_work_is_an_error_not_zeros() {
    let Some((engine, _one_at_a_time)) = engine() else {
        return;
    };
    let small = scratch(&engine, "small", 1).unwrap();
    let large = scratch(&engine, "large", 16).unwrap();
    let mut rec = Recorder::new(&engine);
    // Reads past the end of `small`: the device rejects the whole submission.
    rec.copy(&small, 0, &large, 0, 64);
    let err = block_on(submit_and_read(&engine, rec.into_encoder(), &large, 64))
        .expect_err("an invalid copy must fail the read")
        .to_string();
    assert!(err.contains("WebGPU rejected the work"), "{err}");
    // Rejected work submitted without a read-back (a prompt chunk): the next read reports it,
    // once.
    let mut rec = Recorder::new(&engine);
    rec.copy(&small, 0, &large, 0, 64);
    engine.queue.submit([rec.into_encoder().finish()]);
    let rec = Recorder::new(&engine);
    let err = block_on(submit_and_read(&engine, rec.into_encoder(), &large, 64))
        .expect_err("the earlier rejected work must fail the next read")
        .to_string();
    assert!(err.contains("the WebGPU device reported"), "{err}");
    // The device is still usable.
    let rec = Recorder::new(&engine);
    assert_eq!(read(rec, &large, 16), vec![0.0; 16]);
}

/// The decimal float literals of a WGSL source, outside comments (hex literals are exact).
fn decimal_float_literals(source: &str) -> Vec<String> {
    let mut literals = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or_default().as_bytes();
        let mut i = 0;
        while i < code.len() {
            let starts_token =
                i == 0 || !(code[i - 1].is_ascii_alphanumeric() || b"_.".contains(&code[i - 1]));
            if !(starts_token && code[i].is_ascii_digit()) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < code.len()
                && (code[j].is_ascii_alphanumeric()
                    || code[j] == b'.'
                    || (b"+-".contains(&code[j]) && b"eE".contains(&code[j - 1])))
            {
                j += 1;
            }
            let token = std::str::from_utf8(&code[i..j]).unwrap();
            let hex = token.starts_with("0x") || token.starts_with("0X");
            if !hex && token.contains(['.', 'e', 'E']) {
                literals.push(token.trim_end_matches(['f', 'h']).to_string());
            }
            i = j;
        }
    }
    literals
}

/// Chromium's WGSL compiler (Tint) rejects a float literal beyond f32's range (naga rounds it
/// to the largest f32): one such literal once made every pipeline of its module invalid in the
/// browser, and the chat page answered only token 0.
#[test]
fn every_float_literal_of_the_kernels_fits_f32() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/wgsl");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let source = std::fs::read_to_string(&path).unwrap();
        for literal in decimal_float_literals(&source) {
            let value: f64 = literal
                .parse()
                .unwrap_or_else(|e| panic!("{}: `{literal}`: {e}", path.display()));
            assert!(
                value.abs() <= f64::from(f32::MAX),
                "{}: `{literal}` is beyond f32 (write -0x1.fffffep+127f for -f32::MAX)",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} float literals found in {dir}");
    assert_eq!(
        decimal_float_literals("let a = -3.40282347e38; // 1.5\nlet b = x1 * 0x1p-126f + 2.5f;"),
        ["3.40282347e38", "2.5"]
    );
}
