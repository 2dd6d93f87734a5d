//! Every kernel against a CPU reference written out here in f64 (or, for dequantization, against
//! qlora-core's bitsandbytes-exact CPU dequantization). Skipped, with a printed reason, where no
//! CUDA device opens; `--nocapture` prints each kernel's max relative error.

use half::bf16;
use qlora_core::quant::{
    decode_table, dequantize_4bit, quantize_4bit, FloatSlice, QuantType, Quantized4,
};
use qlora_kernels::{
    CachedAttention, DeviceBuffer, DeviceQuantized, Gemm, GemvKernel, Gpu, Kernels, LoraTerm,
    Precision, SoftmaxArgs,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// `values` on the device in precision `p`.
fn up(gpu: &Gpu, p: Precision, values: &[f32]) -> DeviceBuffer {
    match p {
        Precision::F32 => gpu.upload(values, "test").unwrap(),
        Precision::Bf16 => gpu
            .upload(
                &values
                    .iter()
                    .map(|&v| bf16::from_f32(v))
                    .collect::<Vec<_>>(),
                "test",
            )
            .unwrap(),
    }
}

fn down(gpu: &Gpu, p: Precision, buf: &DeviceBuffer, n: usize) -> Vec<f32> {
    match p {
        Precision::F32 => gpu.read::<f32>(buf.ptr(), n).unwrap(),
        Precision::Bf16 => gpu
            .read::<bf16>(buf.ptr(), n)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect(),
    }
}

/// The values a bf16 run sees: `values` rounded to `p`.
fn rounded(p: Precision, values: &[f32]) -> Vec<f32> {
    match p {
        Precision::F32 => values.to_vec(),
        Precision::Bf16 => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
    }
}

fn rel(ours: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let diff = ours
        .iter()
        .zip(reference)
        .map(|(&a, &b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max);
    let scale = reference
        .iter()
        .map(|b| b.abs())
        .fold(0.0, f64::max)
        .max(1e-30);
    diff / scale
}

fn tolerance(p: Precision) -> f64 {
    match p {
        Precision::F32 => 1e-5,
        Precision::Bf16 => 1e-2,
    }
}

fn each_precision(mut f: impl FnMut(&Gpu, &Kernels, Precision)) {
    let Some(gpu) = gpu() else { return };
    for p in [Precision::F32, Precision::Bf16] {
        let k = gpu.kernels(p).unwrap();
        f(&gpu, &k, p);
    }
}

#[test]
fn dequantization_equals_the_cpu_dequantization_rounded_to_the_precision() {
    each_precision(|gpu, k, p| {
        // 33 x 65 = 2145 values: an odd count and a short last block (the one-byte-per-thread
        // kernel); 48 x 96: a multiple of 8 (the eight-values-per-thread kernel).
        for shape in [[33, 65], [48, 96]] {
            let x = random(shape[0] * shape[1], 1);
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                for dq in [false, true] {
                    for bs in [64, 256] {
                        let q = quantize_4bit(FloatSlice::F32(&x), &shape, qt, bs, dq).unwrap();
                        let cpu = dequantize_4bit(&q).unwrap();
                        let w = DeviceQuantized::upload(gpu, &q, "test").unwrap();
                        let out = gpu.alloc(k.bytes(x.len()), "test").unwrap();
                        k.dequantize(&w, out.ptr()).unwrap();
                        let ours = down(gpu, p, &out, x.len());
                        let expected = rounded(p, &cpu);
                        let mismatches = ours
                            .iter()
                            .zip(&expected)
                            .filter(|(a, b)| a.to_bits() != b.to_bits())
                            .count();
                        println!(
                            "dequant {qt} dq={dq} bs={bs} {p:?}: {mismatches} of {} differ",
                            x.len()
                        );
                        assert_eq!(mismatches, 0);
                    }
                }
            }
        }
    });
}

fn cpu_matmul(a: &[f32], at: bool, b: &[f32], bt: bool, m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for l in 0..k {
                let av = if at { a[l * m + i] } else { a[i * k + l] };
                let bv = if bt { b[j * k + l] } else { b[l * n + j] };
                s += f64::from(av) * f64::from(bv);
            }
            c[i * n + j] = s;
        }
    }
    c
}

#[test]
fn gemm_matches_a_cpu_product_for_every_transpose_and_batching() {
    each_precision(|gpu, _k, p| {
        let (m, n, kk, batches) = (37, 45, 70, 3);
        for (at, bt) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = rounded(p, &random(batches * m * kk, 2));
            let b = rounded(p, &random(batches * kk * n, 3));
            let c0 = random(batches * m * n, 4);
            let (ga, gb, gc) = (
                up(gpu, p, &a),
                up(gpu, p, &b),
                gpu.upload(&c0, "test").unwrap(),
            );
            let g = Gemm::new(
                m,
                n,
                kk,
                ga.ptr(),
                at,
                gb.ptr(),
                bt,
                gc.ptr(),
                p,
                Precision::F32,
            )
            .alpha(0.5)
            .accumulate()
            .batched(batches, m * kk, kk * n, m * n);
            gpu.gemm(&g).unwrap();
            let ours = gpu.read::<f32>(gc.ptr(), batches * m * n).unwrap();
            let mut expected = Vec::new();
            for i in 0..batches {
                let c = cpu_matmul(&a[i * m * kk..], at, &b[i * kk * n..], bt, m, n, kk);
                expected.extend(
                    c.iter()
                        .zip(&c0[i * m * n..])
                        .map(|(v, c)| 0.5 * v + f64::from(*c)),
                );
            }
            let r = rel(&ours, &expected);
            println!("gemm {p:?} at={at} bt={bt}: rel {r:.2e}");
            assert!(r <= tolerance(p), "{r}");
        }
    });
}

#[test]
fn norms_forward_and_backward_match_the_cpu() {
    // 300: rows not 16-byte aligned (element by element); 4096: BLOOM-7b1's rows, one pack per
    // thread; 12000: two packs per thread of 1024 with a ragged end.
    each_precision(|gpu, k, p| {
        for (n, d) in [(7, 300), (3, 4096), (2, 12_000)] {
            check_norms(gpu, k, p, n, d);
        }
    });
}

fn check_norms(gpu: &Gpu, k: &Kernels, p: Precision, n: usize, d: usize) {
    let x = rounded(
        p,
        &random(n * d, 5)
            .iter()
            .map(|v| v * 3.0 + 0.5)
            .collect::<Vec<_>>(),
    );
    let w = rounded(p, &random(d, 6));
    let bias = rounded(p, &random(d, 7));
    let dy = rounded(p, &random(n * d, 8));
    let dx0 = rounded(p, &random(n * d, 9));
    let (gx, gw, gb, gdy) = (
        up(gpu, p, &x),
        up(gpu, p, &w),
        up(gpu, p, &bias),
        up(gpu, p, &dy),
    );
    let out = gpu.alloc(k.bytes(n * d), "t").unwrap();
    let (mean, rstd) = (
        gpu.alloc(4 * n, "t").unwrap(),
        gpu.alloc(4 * n, "t").unwrap(),
    );
    for layer in [true, false] {
        let eps = 1e-5;
        if layer {
            k.layernorm_fwd(
                gx.ptr(),
                gw.ptr(),
                gb.ptr(),
                out.ptr(),
                mean.ptr(),
                rstd.ptr(),
                n,
                d,
                eps,
            )
            .unwrap();
        } else {
            k.rmsnorm_fwd(gx.ptr(), gw.ptr(), out.ptr(), rstd.ptr(), n, d, eps)
                .unwrap();
        }
        let gdx = up(gpu, p, &dx0);
        if layer {
            k.layernorm_bwd(
                gdy.ptr(),
                gx.ptr(),
                gw.ptr(),
                mean.ptr(),
                rstd.ptr(),
                gdx.ptr(),
                n,
                d,
                true,
            )
            .unwrap();
        } else {
            k.rmsnorm_bwd(
                gdy.ptr(),
                gx.ptr(),
                gw.ptr(),
                rstd.ptr(),
                gdx.ptr(),
                n,
                d,
                true,
            )
            .unwrap();
        }
        let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
        for r in 0..n {
            let row: Vec<f64> = x[r * d..(r + 1) * d]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let mu = if layer {
                row.iter().sum::<f64>() / d as f64
            } else {
                0.0
            };
            let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / d as f64;
            let rs = 1.0 / (var + f64::from(eps)).sqrt();
            let xhat: Vec<f64> = row.iter().map(|v| (v - mu) * rs).collect();
            let g: Vec<f64> = (0..d)
                .map(|c| f64::from(dy[r * d + c]) * f64::from(w[c]))
                .collect();
            let mg = if layer {
                g.iter().sum::<f64>() / d as f64
            } else {
                0.0
            };
            let mgx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / d as f64;
            for c in 0..d {
                fwd.push(xhat[c] * f64::from(w[c]) + if layer { f64::from(bias[c]) } else { 0.0 });
                bwd.push(rs * (g[c] - mg - xhat[c] * mgx) + f64::from(dx0[r * d + c]));
            }
        }
        let (rf, rb) = (
            rel(&down(gpu, p, &out, n * d), &fwd),
            rel(&down(gpu, p, &gdx, n * d), &bwd),
        );
        println!(
            "{} {p:?} d={d}: forward rel {rf:.2e}, backward rel {rb:.2e}",
            if layer { "layernorm" } else { "rmsnorm" }
        );
        assert!(rf <= tolerance(p) && rb <= tolerance(p), "d {d}: {rf} {rb}");
    }
}

#[test]
fn activations_forward_and_backward_match_the_cpu() {
    each_precision(|gpu, k, p| {
        let n = 1000;
        let x = rounded(
            p,
            &random(n, 10).iter().map(|v| v * 4.0).collect::<Vec<_>>(),
        );
        let u = rounded(p, &random(n, 11));
        let dy = rounded(p, &random(n, 12));
        let (gx, gu, gdy) = (up(gpu, p, &x), up(gpu, p, &u), up(gpu, p, &dy));
        let out = gpu.alloc(k.bytes(n), "t").unwrap();
        let out2 = gpu.alloc(k.bytes(n), "t").unwrap();
        let f = |i: usize| f64::from(x[i]);
        // tanh GELU and its derivative.
        k.gelu_fwd(gx.ptr(), out.ptr(), n).unwrap();
        k.gelu_bwd(gx.ptr(), gdy.ptr(), out2.ptr(), n).unwrap();
        let gelu: Vec<f64> = (0..n).map(|i| gelu_tanh(f(i))).collect();
        let dgelu: Vec<f64> = (0..n)
            .map(|i| {
                let t = gelu_tanh_inner(f(i)).tanh();
                let v = f(i);
                (0.5 * v * (1.0 - t * t) * (0.79788456 + 0.1070322243 * v * v) + 0.5 * (1.0 + t))
                    * f64::from(dy[i])
            })
            .collect();
        let (r1, r2) = (
            rel(&down(gpu, p, &out, n), &gelu),
            rel(&down(gpu, p, &out2, n), &dgelu),
        );
        println!("gelu {p:?}: forward rel {r1:.2e}, backward rel {r2:.2e}");
        assert!(r1 <= tolerance(p) && r2 <= tolerance(p));
        // silu(gate) * up and its two gradients.
        k.swiglu_fwd(gx.ptr(), gu.ptr(), out.ptr(), n).unwrap();
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let fwd: Vec<f64> = (0..n).map(|i| f(i) * sig(f(i)) * f64::from(u[i])).collect();
        let r3 = rel(&down(gpu, p, &out, n), &fwd);
        k.swiglu_bwd(gx.ptr(), gu.ptr(), gdy.ptr(), out.ptr(), out2.ptr(), n)
            .unwrap();
        let dgate: Vec<f64> = (0..n)
            .map(|i| {
                f64::from(dy[i]) * f64::from(u[i]) * sig(f(i)) * (1.0 + f(i) * (1.0 - sig(f(i))))
            })
            .collect();
        let dup: Vec<f64> = (0..n)
            .map(|i| f64::from(dy[i]) * f(i) * sig(f(i)))
            .collect();
        let (r4, r5) = (
            rel(&down(gpu, p, &out, n), &dgate),
            rel(&down(gpu, p, &out2, n), &dup),
        );
        println!("swiglu {p:?}: forward rel {r3:.2e}, backward rel {r4:.2e} / {r5:.2e}");
        assert!(r3 <= tolerance(p) && r4 <= tolerance(p) && r5 <= tolerance(p));
    });
}

#[test]
fn rope_rotates_pairs_and_its_inverse_undoes_it() {
    each_precision(|gpu, k, p| {
        let (batch, heads, seq, hd) = (2, 3, 5, 8);
        let rows = batch * heads * seq;
        for half in [true, false] {
            let x = rounded(p, &random(rows * hd, 13));
            // Each batch row its own positions (row 1 as if left-padded by two tokens).
            let position = |b: usize, t: usize| (t + 2 * b) as f64;
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for b in 0..batch {
                for t in 0..seq {
                    for c in 0..hd {
                        let pair = if half { c % (hd / 2) } else { c / 2 };
                        let a = position(b, t) * 0.3f64.powi(pair as i32);
                        cos.push(a.cos() as f32);
                        sin.push(a.sin() as f32);
                    }
                }
            }
            let (gc, gs, gx) = (
                gpu.upload(&cos, "t").unwrap(),
                gpu.upload(&sin, "t").unwrap(),
                up(gpu, p, &x),
            );
            k.rope(
                gx.ptr(),
                gc.ptr(),
                gs.ptr(),
                rows,
                heads,
                seq,
                hd,
                half,
                false,
            )
            .unwrap();
            let mut expected = Vec::new();
            for r in 0..rows {
                let table = (r / (heads * seq)) * seq + r % seq;
                for c in 0..hd {
                    let xv = |i: usize| f64::from(x[r * hd + i]);
                    let rotated = match (half, c) {
                        (true, c) if c < hd / 2 => -xv(c + hd / 2),
                        (true, c) => xv(c - hd / 2),
                        (false, c) if c % 2 == 0 => -xv(c + 1),
                        (false, c) => xv(c - 1),
                    };
                    expected.push(
                        xv(c) * f64::from(cos[table * hd + c])
                            + rotated * f64::from(sin[table * hd + c]),
                    );
                }
            }
            let r1 = rel(&down(gpu, p, &gx, rows * hd), &expected);
            k.rope(
                gx.ptr(),
                gc.ptr(),
                gs.ptr(),
                rows,
                heads,
                seq,
                hd,
                half,
                true,
            )
            .unwrap();
            let back: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            let r2 = rel(&down(gpu, p, &gx, rows * hd), &back);
            println!("rope half_split={half} {p:?}: forward rel {r1:.2e}, inverse rel {r2:.2e}");
            assert!(r1 <= tolerance(p) && r2 <= 2.0 * tolerance(p));
        }
    });
}

#[test]
fn masked_softmax_with_alibi_and_its_backward_match_the_cpu() {
    each_precision(|gpu, k, p| {
        let (b, heads, t) = (2, 3, 6);
        let rows = b * heads * t;
        let scores = random(rows * t, 14)
            .iter()
            .map(|v| v * 5.0)
            .collect::<Vec<_>>();
        // Row 1: the first key is padding (left padding), so its query 0 sees no key at all.
        let key_mask: Vec<f32> = (0..b * t).map(|i| if i == t { 0.0 } else { 1.0 }).collect();
        let positions: Vec<f32> = (0..b * t).map(|i| (i % t) as f32).collect();
        let slopes = [0.5f32, 0.25, 0.125];
        let scale = 0.4f32;
        let gs = gpu.upload(&scores, "t").unwrap();
        let probs = gpu.alloc(k.bytes(rows * t), "t").unwrap();
        let (gm, gp, gsl) = (
            gpu.upload(&key_mask, "t").unwrap(),
            gpu.upload(&positions, "t").unwrap(),
            gpu.upload(&slopes, "t").unwrap(),
        );
        k.softmax_fwd(&SoftmaxArgs {
            scores: gs.ptr(),
            probs: probs.ptr(),
            key_mask: gm.ptr(),
            slopes: gsl.ptr(),
            positions: gp.ptr(),
            batch: b,
            kv_heads: heads,
            group: 1,
            seq: t,
            keys: t,
            scale,
        })
        .unwrap();
        let mut expected = Vec::new();
        for r in 0..rows {
            let (i, h, bb) = (r % t, (r / t) % heads, r / (t * heads));
            let visible: Vec<bool> = (0..t)
                .map(|j| j <= i && key_mask[bb * t + j] != 0.0)
                .collect();
            let v: Vec<f64> = (0..t)
                .map(|j| {
                    f64::from(scores[r * t + j]) * f64::from(scale)
                        + f64::from(slopes[h]) * f64::from(positions[bb * t + j])
                })
                .collect();
            if !visible.iter().any(|&x| x) {
                expected.extend(std::iter::repeat_n(1.0 / t as f64, t));
                continue;
            }
            let mx = (0..t)
                .filter(|&j| visible[j])
                .map(|j| v[j])
                .fold(f64::MIN, f64::max);
            let sum: f64 = (0..t)
                .filter(|&j| visible[j])
                .map(|j| (v[j] - mx).exp())
                .sum();
            expected.extend((0..t).map(|j| {
                if visible[j] {
                    (v[j] - mx).exp() / sum
                } else {
                    0.0
                }
            }));
        }
        let ours = down(gpu, p, &probs, rows * t);
        let r1 = rel(&ours, &expected);
        let dp = random(rows * t, 15);
        let gdp = gpu.upload(&dp, "t").unwrap();
        let ds = gpu.alloc(k.bytes(rows * t), "t").unwrap();
        k.softmax_bwd(probs.ptr(), gdp.ptr(), ds.ptr(), rows, t, scale)
            .unwrap();
        let mut dexp = Vec::new();
        for r in 0..rows {
            let pr: Vec<f64> = ours[r * t..(r + 1) * t]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let dot: f64 = (0..t).map(|j| pr[j] * f64::from(dp[r * t + j])).sum();
            dexp.extend(
                (0..t).map(|j| f64::from(scale) * pr[j] * (f64::from(dp[r * t + j]) - dot)),
            );
        }
        let r2 = rel(&down(gpu, p, &ds, rows * t), &dexp);
        println!("softmax {p:?}: forward rel {r1:.2e}, backward rel {r2:.2e}");
        assert!(r1 <= tolerance(p) && r2 <= tolerance(p));
    });
}

#[test]
fn cross_entropy_loss_and_gradient_match_the_cpu() {
    each_precision(|gpu, k, p| {
        let (n, v) = (5, 3000);
        let logits = random(n * v, 16)
            .iter()
            .map(|x| x * 8.0)
            .collect::<Vec<_>>();
        let targets = [3u32, 0, 2999, 17, 5];
        let weights = [1.0f32, 0.0, 1.0, 1.0, 1.0];
        let inv_count = 0.25f32;
        let (gl, gt, gw) = (
            gpu.upload(&logits, "t").unwrap(),
            gpu.upload(&targets, "t").unwrap(),
            gpu.upload(&weights, "t").unwrap(),
        );
        let loss = gpu.alloc(4 * n, "t").unwrap();
        let grad = gpu.alloc(k.bytes(n * v), "t").unwrap();
        k.cross_entropy(
            gl.ptr(),
            gt.ptr(),
            gw.ptr(),
            loss.ptr(),
            grad.ptr(),
            n,
            v,
            inv_count,
        )
        .unwrap();
        let (mut el, mut eg) = (Vec::new(), Vec::new());
        for r in 0..n {
            let row: Vec<f64> = logits[r * v..(r + 1) * v]
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let mx = row.iter().copied().fold(f64::MIN, f64::max);
            let sum: f64 = row.iter().map(|x| (x - mx).exp()).sum();
            let w = f64::from(weights[r]);
            el.push(w * (mx + sum.ln() - row[targets[r] as usize]));
            for (j, x) in row.iter().enumerate() {
                let onehot = if j == targets[r] as usize { 1.0 } else { 0.0 };
                eg.push(w * f64::from(inv_count) * ((x - mx).exp() / sum - onehot));
            }
        }
        let r1 = rel(&gpu.read::<f32>(loss.ptr(), n).unwrap(), &el);
        let r2 = rel(&down(gpu, p, &grad, n * v), &eg);
        println!("cross-entropy {p:?}: loss rel {r1:.2e}, gradient rel {r2:.2e}");
        assert!(r1 <= 1e-5 && r2 <= tolerance(p));
    });
}

#[test]
fn embedding_dropout_and_head_layout_kernels() {
    each_precision(|gpu, k, p| {
        let (vocab, hidden) = (50, 24);
        let table = rounded(p, &random(vocab * hidden, 17));
        let ids = [3u32, 49, 0, 3];
        let (gt, gi) = (up(gpu, p, &table), gpu.upload(&ids, "t").unwrap());
        let out = gpu.alloc(k.bytes(ids.len() * hidden), "t").unwrap();
        k.embedding(gi.ptr(), gt.ptr(), out.ptr(), ids.len(), hidden)
            .unwrap();
        let rows: Vec<f32> = ids
            .iter()
            .flat_map(|&i| table[i as usize * hidden..(i as usize + 1) * hidden].to_vec())
            .collect();
        assert_eq!(down(gpu, p, &out, ids.len() * hidden), rows);
        // The first three (distinct) gathered rows scattered back into a cleared table.
        let scattered = up(gpu, p, &vec![0.0; vocab * hidden]);
        k.scatter_rows(gi.ptr(), out.ptr(), scattered.ptr(), 3, hidden)
            .unwrap();
        let back = down(gpu, p, &scattered, vocab * hidden);
        for (r, row) in back.chunks_exact(hidden).enumerate() {
            let kept = ids[..3].contains(&(r as u32));
            let want = &table[r * hidden..(r + 1) * hidden];
            assert!(row
                .iter()
                .zip(want)
                .all(|(&g, &w)| g == if kept { w } else { 0.0 }));
        }

        // Dropout: about p zeroed, the rest scaled by 1/(1-p); the same seed, the same mask.
        let n = 20000;
        let ones = up(gpu, p, &vec![1.0; n]);
        let (d1, d2) = (
            gpu.alloc(k.bytes(n), "t").unwrap(),
            gpu.alloc(k.bytes(n), "t").unwrap(),
        );
        k.dropout(ones.ptr(), d1.ptr(), n, 0.25, 7).unwrap();
        k.dropout(ones.ptr(), d2.ptr(), n, 0.25, 7).unwrap();
        let (a, b) = (down(gpu, p, &d1, n), down(gpu, p, &d2, n));
        assert_eq!(a, b);
        let zeros = a.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!((zeros - 0.25).abs() < 0.02, "{zeros}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-2));

        // [B, T, heads, 3, hd] slot 1 -> [B, heads, T, hd] and back, element by element (hd 5)
        // and in packs of eight (hd 16).
        for hd in [5, 16] {
            let (bb, t, heads) = (2, 3, 4);
            let src = rounded(p, &random(bb * t * heads * 3 * hd, 18));
            let gsrc = up(gpu, p, &src);
            let dst = gpu.alloc(k.bytes(bb * heads * t * hd), "t").unwrap();
            k.heads_from_tokens(gsrc.ptr(), dst.ptr(), bb, t, heads, 3, 1, hd)
                .unwrap();
            let got = down(gpu, p, &dst, bb * heads * t * hd);
            for (i, v) in got.iter().enumerate() {
                let (d, tt, h, b0) = (
                    i % hd,
                    (i / hd) % t,
                    (i / (hd * t)) % heads,
                    i / (hd * t * heads),
                );
                assert_eq!(*v, src[(((b0 * t + tt) * heads + h) * 3 + 1) * hd + d]);
            }
            let back = up(gpu, p, &vec![0.0; src.len()]);
            k.tokens_from_heads(dst.ptr(), back.ptr(), bb, t, heads, 3, 1, hd)
                .unwrap();
            let back = down(gpu, p, &back, src.len());
            for (i, v) in back.iter().enumerate() {
                let slot = (i / hd) % 3;
                assert_eq!(*v, if slot == 1 { src[i] } else { 0.0 });
            }
        }
    });
}

/// The argument of BLOOM's tanh GELU: sqrt(2 / pi) (v + 0.044715 v^3).
fn gelu_tanh_inner(v: f64) -> f64 {
    0.79788456 * v * (1.0 + 0.044715 * v * v)
}

/// BLOOM's tanh GELU in f64: the reference of gelu_fwd and of the GEMV's decoding epilogue.
fn gelu_tanh(v: f64) -> f64 {
    0.5 * v * (1.0 + gelu_tanh_inner(v).tanh())
}

/// `w` ([out, in]) quantized as each 4-bit type with each (double quant, block size) of
/// `variants`, handed to `f` with those settings.
fn each_4bit(
    w: &[f32],
    shape: [usize; 2],
    variants: [(bool, usize); 3],
    mut f: impl FnMut(QuantType, bool, usize, Quantized4),
) {
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        for (dq, bs) in variants {
            f(
                qt,
                dq,
                bs,
                quantize_4bit(FloatSlice::F32(w), &shape, qt, bs, dq).unwrap(),
            );
        }
    }
}

#[test]
fn fused_4bit_gemv_matches_the_dequantized_product() {
    each_precision(|gpu, k, p| {
        // 96 outputs x 320 inputs: ten 32-code chunks per row (more chunks than a warp has
        // lanes would need 1024+ inputs; 1056 covers a lane with two chunks; 8224 the wide
        // kernel's second group of four chunks per lane, and a partial one).
        for (out_features, in_features) in [(96, 320), (40, 1056), (24, 8224)] {
            let w = random(out_features * in_features, 21);
            let bias = rounded(p, &random(out_features, 22));
            let variants = [(false, 64), (true, 64), (true, 128)];
            each_4bit(
                &w,
                [out_features, in_features],
                variants,
                |qt, dq, bs, q| {
                    let dense = dequantize_4bit(&q).unwrap();
                    let dq_w = DeviceQuantized::upload(gpu, &q, "test").unwrap();
                    assert!(dq_w.gemv_ready());
                    for rows in [1, 2, 3, 4] {
                        let x = rounded(p, &random(rows * in_features, 23 + rows as u64));
                        let mut expected =
                            cpu_matmul(&x, false, &dense, true, rows, out_features, in_features);
                        for (i, e) in expected.iter_mut().enumerate() {
                            *e += f64::from(bias[i % out_features]);
                        }
                        let (gx, gb) = (up(gpu, p, &x), up(gpu, p, &bias));
                        let y = gpu.alloc(k.bytes(rows * out_features), "test").unwrap();
                        // Both GEMVs: the same bits.
                        k.set_gemv(GemvKernel::Wide);
                        k.gemv_4bit(&dq_w, gx.ptr(), gb.ptr(), 0, false, y.ptr(), rows)
                            .unwrap();
                        let wide = down(gpu, p, &y, rows * out_features);
                        k.set_gemv(GemvKernel::OneChunk);
                        k.gemv_4bit(&dq_w, gx.ptr(), gb.ptr(), 0, false, y.ptr(), rows)
                            .unwrap();
                        let one_chunk = down(gpu, p, &y, rows * out_features);
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&wide), bits(&one_chunk), "wide vs one-chunk GEMV");
                        let r = rel(&one_chunk, &expected);
                        println!(
                            "gemv_4bit {qt} dq={dq} bs={bs} {out_features}x{in_features} rows={rows} {p:?}: rel {r:.2e}"
                        );
                        assert!(r <= tolerance(p), "rel {r}");
                        // The decoding epilogue: gelu(x W^T + b) + residual.
                        let residual = rounded(p, &random(rows * out_features, 24));
                        let gr = up(gpu, p, &residual);
                        k.gemv_4bit(&dq_w, gx.ptr(), gb.ptr(), gr.ptr(), true, y.ptr(), rows)
                            .unwrap();
                        let expected: Vec<f64> = expected
                            .iter()
                            .zip(&residual)
                            .map(|(&v, &res)| gelu_tanh(v) + f64::from(res))
                            .collect();
                        let r = rel(&down(gpu, p, &y, rows * out_features), &expected);
                        assert!(r <= tolerance(p), "gelu + residual: rel {r}");
                    }
                },
            );
        }
    });
}

/// The weights `gemv_4bit_tc` multiplies by: each dequantized in bf16 as bitsandbytes' batch-1
/// kernel does it, bf16(code) * bf16(absmax) rounded to bf16.
fn bf16_dequantized(q: &Quantized4) -> Vec<f32> {
    let code = decode_table(q.quant_type);
    let absmax = q.absmax.to_f32().unwrap();
    let b = |v: f32| bf16::from_f32(v).to_f32();
    (0..q.numel())
        .map(|i| {
            let byte = q.packed[i / 2];
            let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
            b(b(code[nibble as usize]) * b(absmax[i / q.blocksize]))
        })
        .collect()
}

#[test]
fn tensor_core_gemv_matches_bf16_dequantized_weights() {
    let Some(gpu) = gpu() else { return };
    let p = Precision::Bf16;
    let k = gpu.kernels(p).unwrap();
    k.set_gemv(GemvKernel::Tensor);
    // 128-wide input steps: 3 and 8 (fewer than the block's sixteen warps: the others re-read
    // the last step with a zero scale), 34 (two warps with three steps, the others two and one
    // re-read); 40 and 24 outputs leave a partial tile of 16; 272 outputs give the persistent
    // blocks more than one tile each on a small grid. Rows: 1-4, a full pass of 8, and 13 (two
    // passes, the second from row 8 of x, y and the residual).
    for (out_features, in_features) in [(40, 384), (24, 1024), (272, 4352)] {
        let w = random(out_features * in_features, 31);
        let bias = rounded(p, &random(out_features, 32));
        let variants = [(false, 64), (true, 64), (true, 256)];
        each_4bit(
            &w,
            [out_features, in_features],
            variants,
            |qt, dq, bs, q| {
                let weights = bf16_dequantized(&q);
                let mut dq_w = DeviceQuantized::upload(&gpu, &q, "test").unwrap();
                // Double-quantized weights take the tensor-core GEMV once their absmax codes
                // are in its order (checked below through gemv_max_rows).
                k.prepare_gemv(&gpu, &mut dq_w).unwrap();
                for rows in [1, 2, 3, 4, 8, 13] {
                    let x = rounded(p, &random(rows * in_features, 33 + rows as u64));
                    let residual = rounded(p, &random(rows * out_features, 34));
                    let product =
                        cpu_matmul(&x, false, &weights, true, rows, out_features, in_features);
                    let (gx, gb, gr) =
                        (up(&gpu, p, &x), up(&gpu, p, &bias), up(&gpu, p, &residual));
                    let y = gpu.alloc(k.bytes(rows * out_features), "test").unwrap();
                    for epilogue in [false, true] {
                        let (res, gelu) = if epilogue {
                            (gr.ptr(), true)
                        } else {
                            (0, false)
                        };
                        k.gemv_4bit(&dq_w, gx.ptr(), gb.ptr(), res, gelu, y.ptr(), rows)
                            .unwrap();
                        let expected: Vec<f64> = product
                            .iter()
                            .enumerate()
                            .map(|(i, &v)| {
                                let v = v + f64::from(bias[i % out_features]);
                                if !epilogue {
                                    return v;
                                }
                                gelu_tanh(v) + f64::from(residual[i])
                            })
                            .collect();
                        let got = down(&gpu, p, &y, rows * out_features);
                        // f32 sums of exact products, then one rounding to bf16.
                        let r = rel(&got, &expected);
                        println!(
                            "gemv_4bit_tc {qt} dq={dq} bs={bs} {out_features}x{in_features} rows={rows} epilogue={epilogue}: rel {r:.2e}"
                        );
                        assert!(r <= 8e-3, "rel {r}");
                    }
                }
                // More rows than four passes go through a dequantized copy: refused here.
                let limit = k.gemv_max_rows(&dq_w, 0);
                assert_eq!(limit, 32);
                assert!(k.gemv_4bit(&dq_w, 0, 0, 0, false, 0, limit + 1).is_err());
            },
        );
    }
}

#[test]
fn adapter_term_in_the_gemv_matches_the_adapter_product() {
    let Some(gpu) = gpu() else { return };
    let p = Precision::Bf16;
    let k = gpu.kernels(p).unwrap();
    k.set_gemv(GemvKernel::Tensor);
    let (r, scale) = (16, 2.0f32);
    // Rows 13: two passes, the second reading xa from row 8 on.
    for (out_features, in_features) in [(40, 384), (272, 4096)] {
        let w = random(out_features * in_features, 51);
        let bias = rounded(p, &random(out_features, 52));
        let a = rounded(p, &random(r * in_features, 53));
        let b = rounded(p, &random(out_features * r, 54));
        let (gbias, ga, gb) = (up(&gpu, p, &bias), up(&gpu, p, &a), up(&gpu, p, &b));
        each_4bit(
            &w,
            [out_features, in_features],
            [(false, 64), (true, 64), (true, 256)],
            |qt, dq, bs, q| {
                let weights = bf16_dequantized(&q);
                let mut dq_w = DeviceQuantized::upload(&gpu, &q, "test").unwrap();
                k.prepare_gemv(&gpu, &mut dq_w).unwrap();
                for rows in [1, 3, 8, 13] {
                    let x = rounded(p, &random(rows * in_features, 55 + rows as u64));
                    let residual = rounded(p, &random(rows * out_features, 56));
                    let product =
                        cpu_matmul(&x, false, &weights, true, rows, out_features, in_features);
                    let xa_ref = cpu_matmul(&x, false, &a, true, rows, r, in_features);
                    let (gx, gr) = (up(&gpu, p, &x), up(&gpu, p, &residual));
                    let xa = gpu.alloc(4 * rows * r, "test").unwrap();
                    k.lora_down(gx.ptr(), ga.ptr(), xa.ptr(), rows, r, in_features)
                        .unwrap();
                    let got_xa = down(&gpu, Precision::F32, &xa, rows * r);
                    let rx = rel(&got_xa, &xa_ref);
                    assert!(rx <= 1e-5, "lora_down rel {rx}");
                    let y = gpu.alloc(k.bytes(rows * out_features), "test").unwrap();
                    let term = LoraTerm {
                        xa: xa.ptr(),
                        b: gb.ptr(),
                        r,
                        scale,
                    };
                    assert!(k.gemv_takes_lora(&dq_w, gx.ptr()));
                    k.gemv_4bit_lora(
                        &dq_w,
                        gx.ptr(),
                        &term,
                        gbias.ptr(),
                        gr.ptr(),
                        true,
                        y.ptr(),
                        rows,
                    )
                    .unwrap();
                    let expected: Vec<f64> = product
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| {
                            let (row, o) = (i / out_features, i % out_features);
                            let adapter: f64 = (0..r)
                                .map(|j| xa_ref[row * r + j] * f64::from(b[o * r + j]))
                                .sum();
                            let v = v + f64::from(bias[o]) + f64::from(scale) * adapter;
                            gelu_tanh(v) + f64::from(residual[i])
                        })
                        .collect();
                    let got = down(&gpu, p, &y, rows * out_features);
                    let ry = rel(&got, &expected);
                    println!(
                        "gemv_4bit_lora {qt} dq={dq} bs={bs} {out_features}x{in_features} rows={rows}: xa rel {rx:.2e}, y rel {ry:.2e}"
                    );
                    assert!(ry <= 8e-3, "rel {ry}");
                }
            },
        );
    }
}

/// One attention_cached case: `keys` filled columns of `capacity`, the last `seq` of them new;
/// row 0's first two keys are padding, and row 1 sees no key at all when `blind_row`.
struct AttentionCase {
    keys: usize,
    seq: usize,
    capacity: usize,
    blind_row: bool,
}

#[test]
fn cached_attention_matches_a_cpu_softmax_over_the_visible_keys() {
    // 2 rows, 4 query heads over 2 kv heads, hd 16 (hd 20: packs of 8 with a ragged end). Two
    // new queries over 7 keys in room for 12 (one split); one query over 150 keys in room for
    // 200 (the keys split across blocks and combined), with a row that sees no key (uniform
    // weights).
    let cases = [
        (
            16,
            AttentionCase {
                keys: 7,
                seq: 2,
                capacity: 12,
                blind_row: false,
            },
        ),
        (
            16,
            AttentionCase {
                keys: 7,
                seq: 2,
                capacity: 12,
                blind_row: true,
            },
        ),
        (
            16,
            AttentionCase {
                keys: 150,
                seq: 1,
                capacity: 200,
                blind_row: true,
            },
        ),
        (
            20,
            AttentionCase {
                keys: 150,
                seq: 1,
                capacity: 200,
                blind_row: false,
            },
        ),
    ];
    each_precision(|gpu, k, p| {
        for (hd, case) in &cases {
            check_cached_attention(gpu, k, p, *hd, case);
        }
    });
}

fn check_cached_attention(gpu: &Gpu, k: &Kernels, p: Precision, hd: usize, case: &AttentionCase) {
    let AttentionCase {
        keys,
        seq,
        capacity,
        blind_row,
    } = *case;
    let (batch, heads, kv_heads) = (2, 4, 2);
    let q = rounded(p, &random(batch * heads * seq * hd, 31));
    let kc = rounded(p, &random(batch * kv_heads * capacity * hd, 32));
    let vc = rounded(p, &random(batch * kv_heads * capacity * hd, 33));
    let mut mask = vec![1f32; batch * keys];
    mask[0] = 0.0;
    mask[1] = 0.0;
    if blind_row {
        mask[keys..].fill(0.0);
    }
    let mut positions = Vec::new();
    for row in mask.chunks(keys) {
        let mut real = 0f32;
        for &m in row {
            real += m;
            positions.push((real - 1.0) * m);
        }
    }
    let slopes = [0.5f32, 0.25, 0.125, 0.0625];
    let scale = 1.0 / (hd as f32).sqrt();
    for alibi in [false, true] {
        let mut expected = Vec::new();
        for b in 0..batch {
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let value = |j: usize, d: usize| {
                    f64::from(vc[((b * kv_heads + kv) * capacity + j) * hd + d])
                };
                for t in 0..seq {
                    let query = &q[((b * heads + h) * seq + t) * hd..][..hd];
                    let last = keys - seq + t;
                    let scores: Vec<Option<f64>> = (0..keys)
                        .map(|j| {
                            if j > last || mask[b * keys + j] == 0.0 {
                                return None;
                            }
                            let key = &kc[((b * kv_heads + kv) * capacity + j) * hd..][..hd];
                            let dot: f64 = query
                                .iter()
                                .zip(key)
                                .map(|(&a, &c)| f64::from(a) * f64::from(c))
                                .sum();
                            let bias = if alibi {
                                f64::from(slopes[h]) * f64::from(positions[b * keys + j])
                            } else {
                                0.0
                            };
                            Some(dot * f64::from(scale) + bias)
                        })
                        .collect();
                    let max = scores.iter().flatten().fold(f64::MIN, |a, &s| a.max(s));
                    let total: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                    for d in 0..hd {
                        if total == 0.0 {
                            // No key visible: uniform weights over every filled column.
                            expected
                                .push((0..keys).map(|j| value(j, d)).sum::<f64>() / keys as f64);
                            continue;
                        }
                        let acc: f64 = scores
                            .iter()
                            .enumerate()
                            .filter_map(|(j, s)| s.map(|s| (s - max).exp() / total * value(j, d)))
                            .sum();
                        expected.push(acc);
                    }
                }
            }
        }
        let (gq, gk, gv) = (up(gpu, p, &q), up(gpu, p, &kc), up(gpu, p, &vc));
        let gm = gpu.upload(&mask, "t").unwrap();
        let gpos = gpu.upload(&positions, "t").unwrap();
        let gs = gpu.upload(&slopes, "t").unwrap();
        let past_len = gpu.upload(&[(keys - seq) as i32], "t").unwrap();
        let context = gpu.alloc(k.bytes(expected.len()), "t").unwrap();
        let attention = CachedAttention {
            q: gq.ptr(),
            q_head_stride: seq * hd,
            k_cache: gk.ptr(),
            v_cache: gv.ptr(),
            context: context.ptr(),
            key_mask: gm.ptr(),
            slopes: if alibi { gs.ptr() } else { 0 },
            positions: gpos.ptr(),
            mask_stride: keys,
            batch,
            heads,
            kv_heads,
            seq,
            past_len: past_len.ptr(),
            capacity,
            hd,
            scale,
        };
        let partial = gpu.alloc(attention.partial_bytes().max(4), "t").unwrap();
        k.attention_cached(&attention, partial.ptr()).unwrap();
        let r = rel(&down(gpu, p, &context, expected.len()), &expected);
        let splits = attention.splits();
        println!(
            "attention_cached keys={keys} splits={splits} hd={hd} alibi={alibi} {p:?}: rel {r:.2e}"
        );
        assert!(
            r <= tolerance(p),
            "keys {keys} splits {splits} hd {hd} alibi {alibi}: rel {r}"
        );
        assert_eq!(splits > 1, keys > 100, "the case meant to split does");
    }
}

#[test]
fn kv_append_writes_the_new_columns_only() {
    each_precision(|gpu, k, p| {
        let (batch, kv_heads, hd, seq, capacity) = (2, 2, 16, 2, 12);
        let kc = rounded(p, &random(batch * kv_heads * capacity * hd, 32));
        let vc = rounded(p, &random(batch * kv_heads * capacity * hd, 33));
        // kv_append writes this step's keys and values at columns 5.. of the caches, read
        // from one source that interleaves them per head (head stride 2 * seq * hd, values
        // seq * hd after the keys).
        let rows = batch * kv_heads;
        let src = rounded(p, &random(rows * 2 * seq * hd, 34));
        let gsrc = up(gpu, p, &src);
        let (kcache, vcache) = (up(gpu, p, &kc), up(gpu, p, &vc));
        let five = gpu.upload(&[5i32], "t").unwrap();
        k.kv_append(
            [gsrc.ptr(), gsrc.at(k.bytes(seq * hd))],
            [kcache.ptr(), vcache.ptr()],
            rows,
            seq,
            capacity,
            five.ptr(),
            hd,
            2 * seq * hd,
        )
        .unwrap();
        for (slot, (cache, before)) in [(kcache, &kc), (vcache, &vc)].into_iter().enumerate() {
            let after = down(gpu, p, &cache, before.len());
            for r in 0..rows {
                for c in 0..capacity {
                    let got = &after[(r * capacity + c) * hd..][..hd];
                    let want = if (5..5 + seq).contains(&c) {
                        &src[r * 2 * seq * hd + slot * seq * hd + (c - 5) * hd..][..hd]
                    } else {
                        &before[(r * capacity + c) * hd..][..hd]
                    };
                    assert_eq!(got, want, "cache {slot} row {r} column {c}");
                }
            }
        }
    });
}

#[test]
fn dense_gemv_matches_a_cpu_product_and_refuses_what_it_cannot_serve() {
    each_precision(|gpu, k, p| {
        // More output features than one wave of warps (the grid strides), and 2,056 inputs: a
        // lane's last batch of words is partial in both precisions.
        let (out, inp) = (9001, 2056);
        let w = rounded(p, &random(out * inp, 71));
        let gw = up(gpu, p, &w);
        for rows in 1..=4 {
            let x = rounded(p, &random(rows * inp, 72 + rows as u64));
            let (gx, gy) = (up(gpu, p, &x), gpu.alloc(4 * rows * out, "t").unwrap());
            assert!(k.gemv_dense_serves(rows, inp, gw.ptr(), gx.ptr()));
            k.gemv_dense(gw.ptr(), gx.ptr(), gy.ptr(), rows, inp, out)
                .unwrap();
            let ours = gpu.read::<f32>(gy.ptr(), rows * out).unwrap();
            let r = rel(&ours, &cpu_matmul(&x, false, &w, true, rows, out, inp));
            println!("gemv_dense {p:?} rows={rows}: rel {r:.2e}");
            // Sums in f32 whatever the precision of the operands.
            assert!(r <= 1e-5, "{r}");
        }
        let gx = up(gpu, p, &random(5 * inp, 80));
        assert!(!k.gemv_dense_serves(5, inp, gw.ptr(), gx.ptr()));
        assert!(!k.gemv_dense_serves(1, inp, gw.ptr(), gx.ptr() + 4));
        assert!(!k.gemv_dense_serves(1, 2051, gw.ptr(), gx.ptr()));
        let gy = gpu.alloc(4 * 5 * out, "t").unwrap();
        let refused = k.gemv_dense(gw.ptr(), gx.ptr(), gy.ptr(), 5, inp, out);
        assert!(refused.unwrap_err().to_string().contains("5 rows"));
    });
}

#[test]
fn greedy_choice_over_a_large_vocabulary_is_the_first_maximum() {
    let Some(gpu) = gpu() else { return };
    let k = gpu.kernels(Precision::F32).unwrap();
    // BLOOM's vocabulary (123 slices): row 0 random with its maximum repeated in a later slice,
    // row 1 only NaN (token 0), row 2 NaN up to 1000 and -inf after (the first -inf).
    let vocab = 250_684;
    let mut logits = random(3 * vocab, 61);
    logits[70_000] = 2.0;
    logits[200_001] = 2.0;
    logits[vocab..2 * vocab].fill(f32::NAN);
    logits[2 * vocab..2 * vocab + 1000].fill(f32::NAN);
    logits[2 * vocab + 1000..].fill(f32::NEG_INFINITY);
    let g = gpu.upload(&logits, "t").unwrap();
    let ids = gpu.alloc(12, "t").unwrap();
    let partial = gpu
        .alloc(Kernels::argmax_partial_bytes(3, vocab), "t")
        .unwrap();
    k.argmax_rows(g.ptr(), ids.ptr(), 3, vocab, partial.ptr())
        .unwrap();
    assert_eq!(
        gpu.read::<u32>(ids.ptr(), 3).unwrap(),
        vec![70_000, 0, 1000]
    );
}

#[test]
fn greedy_choice_applies_the_penalty_and_takes_the_first_maximum() {
    let Some(gpu) = gpu() else { return };
    let k = gpu.kernels(Precision::F32).unwrap();
    let vocab = 3000;
    let mut logits = random(2 * vocab, 41);
    // Row 0: a tie between 17 and 2900 (the first wins); row 1: the maximum at 5 is penalized
    // (positive: divided) below 1200's, and a negative logit at 7 gets more negative.
    logits[17] = 5.0;
    logits[2900] = 5.0;
    logits[vocab + 5] = 4.0;
    logits[vocab + 1200] = 3.0;
    logits[vocab + 7] = -2.0;
    let g = gpu.upload(&logits, "t").unwrap();
    let tokens = gpu.upload(&[0u32, 0, 5, 7], "t").unwrap();
    let counts = gpu.upload(&[0i32, 2], "t").unwrap();
    k.repetition_penalty(g.ptr(), tokens.ptr(), counts.ptr(), 2, 2, vocab, 2.0)
        .unwrap();
    // Row 0's tie lies across two of the slices the first pass reduces.
    let ids = gpu.alloc(8, "t").unwrap();
    let partial = gpu
        .alloc(Kernels::argmax_partial_bytes(2, vocab), "t")
        .unwrap();
    k.argmax_rows(g.ptr(), ids.ptr(), 2, vocab, partial.ptr())
        .unwrap();
    assert_eq!(gpu.read::<u32>(ids.ptr(), 2).unwrap(), vec![17, 1200]);
    let after = gpu.read::<f32>(g.ptr(), 2 * vocab).unwrap();
    assert_eq!((after[vocab + 5], after[vocab + 7]), (2.0, -4.0));
    assert_eq!(after[0], logits[0], "row 0 has no penalized tokens");
}

#[test]
fn top_k_candidates_keep_every_score_not_below_the_kth_largest() {
    let Some(gpu) = gpu() else { return };
    let k = gpu.kernels(Precision::F32).unwrap();
    let (batch, vocab, room) = (3, 5000, 300);
    // Row 0 random, row 1 coarse (many ties, also at the k-th largest), row 2 with -inf and
    // signed zeros.
    let mut logits = random(batch * vocab, 51);
    for v in &mut logits[vocab..2 * vocab] {
        *v = (*v * 8.0).round();
    }
    for (j, v) in logits[2 * vocab..].iter_mut().enumerate() {
        match j % 7 {
            0 => *v = f32::NEG_INFINITY,
            1 => *v = 0.0,
            2 => *v = -0.0,
            _ => {}
        }
    }
    let inv_temperature = 1.0 / 0.7f32;
    let found = gpu.alloc(4 * (2 * batch * room + batch), "t").unwrap();
    let g = gpu.upload(&logits, "t").unwrap();
    for top_k in [1, 7, 50, 200] {
        k.top_k_candidates(
            g.ptr(),
            batch,
            vocab,
            inv_temperature,
            top_k,
            [found.ptr(), found.at(4 * batch * room)],
            room,
            found.at(8 * batch * room),
        )
        .unwrap();
        let words: Vec<u32> = gpu.read(found.ptr(), 2 * batch * room + batch).unwrap();
        for row in 0..batch {
            let scores: Vec<f32> = logits[row * vocab..][..vocab]
                .iter()
                .map(|&l| l * inv_temperature)
                .collect();
            let mut sorted = scores.clone();
            sorted.sort_unstable_by(|a, b| b.total_cmp(a));
            let kth = sorted[top_k - 1];
            let expected: Vec<(u32, u32)> = (0..vocab)
                .filter(|&j| scores[j].partial_cmp(&kth) != Some(std::cmp::Ordering::Less))
                .map(|j| (j as u32, scores[j].to_bits()))
                .collect();
            let count = words[2 * batch * room + row] as usize;
            assert_eq!(count, expected.len(), "row {row} k {top_k}");
            let mut got: Vec<(u32, u32)> = (0..count.min(room))
                .map(|i| (words[row * room + i], words[batch * room + row * room + i]))
                .collect();
            got.sort_unstable();
            if count <= room {
                assert_eq!(got, expected, "row {row} k {top_k}");
            }
        }
    }
}
