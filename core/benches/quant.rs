//! Throughput of NF4 quantization with double quant (QLoRA's setting) of a bf16 weight of
//! 4096 x 4096 (16.8 M parameters, one attention projection of a 7B model), and of its
//! dequantization (into a fresh vector, and into a reused buffer). `cargo bench -p qlora-core --bench quant`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use qlora_core::quant::{
    dequantize_4bit, dequantize_4bit_into, quantize_4bit, FloatSlice, QuantType,
};

const ROWS: usize = 4096;
const COLS: usize = 4096;

/// Deterministic values spread like weights (a few outliers, many near zero).
fn weight() -> Vec<bf16> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..ROWS * COLS)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            bf16::from_f32(u * u * u * 8.0)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let w = weight();
    let shape = [ROWS, COLS];
    let mut group = c.benchmark_group("nf4_bf16_dq_bs64");
    group.throughput(Throughput::Elements((ROWS * COLS) as u64));
    group.sample_size(10);
    group.bench_function("quantize", |b| {
        b.iter(|| {
            quantize_4bit(
                FloatSlice::BF16(black_box(&w)),
                &shape,
                QuantType::Nf4,
                64,
                true,
            )
            .unwrap()
        })
    });
    let q = quantize_4bit(FloatSlice::BF16(&w), &shape, QuantType::Nf4, 64, true).unwrap();
    group.bench_function("dequantize", |b| {
        b.iter(|| dequantize_4bit(black_box(&q)).unwrap())
    });
    let mut out = vec![0.0f32; ROWS * COLS];
    group.bench_function("dequantize_into", |b| {
        b.iter(|| dequantize_4bit_into(black_box(&q), &mut out).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
