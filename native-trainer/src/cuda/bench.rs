//! `qlora bench train`: training throughput and peak GPU memory on a BLOOM-7b1-shaped model with
//! random weights (YaYi-7B's architecture), configured as `shared/anchors/hf_qlora_bench.py`
//! configures the reference stack: nf4 with double quantization, LoRA r=16, alpha=32, dropout
//! 0.05 on query_key_value, bf16; the median step time after two warm-up steps. Data-parallel
//! (`--nproc_per_node`): each rank trains its own micro-batch and the LoRA gradients are summed
//! by NCCL before the update, as in training; tokens/s then count every GPU.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use half::bf16;
use qlora_core::arch::{LoraConfig, ModelConfig, TargetModules};
use qlora_core::checkpoint::{RawTensor, TensorInfo, TensorSource};
use qlora_core::data::{Batch, IGNORE_INDEX};
use qlora_core::quant::{Absmax, DoubleQuant, QuantType, Quantized4, NESTED_BLOCKSIZE};
use qlora_core::{DType, Error, Result};

use super::batch::GpuBatch;
use super::model::{CudaModel, CudaOptions};
use crate::cpu::lora::{LoraInit, LoraSetup};
use crate::train::optimizer::AdamWParams;
use crate::train::Collective;
use qlora_kernels::{Gpu, Precision};

/// Parameters of BLOOM-7b1 (for the FLOP floor).
pub const BLOOM_7B1_PARAMS: f64 = 7.07e9;

/// The BLOOM-7b1 config with `layers` blocks (30 in the real model).
pub fn bloom_7b1(layers: usize) -> Result<ModelConfig> {
    let json = format!(
        r#"{{"model_type": "bloom", "vocab_size": 250880, "hidden_size": 4096, "n_layer": {layers},
            "n_head": 32, "layer_norm_epsilon": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}}"#
    );
    ModelConfig::parse(&json, "BLOOM-7b1 (built in)")
}

/// xorshift64*: fast, seeded filler for random weights.
pub(super) struct Filler(pub(super) u64);

impl Filler {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
    /// Uniform in `[-scale, scale)`.
    fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
}

/// Random weights of a model's shapes: the linear projections as nf4 with double quantization
/// (random codes and absmax codes, absmax around 0.02), everything else bf16 (norms at 1 and 0,
/// embeddings and biases uniform in ±0.02). Weights of one shape share their random content;
/// each layer still gets its own copy on the GPU.
pub struct RandomBase {
    infos: Vec<TensorInfo>,
    linear: HashMap<String, Vec<usize>>,
    packed: Mutex<HashMap<Vec<usize>, Quantized4>>,
}

impl RandomBase {
    pub fn new(config: &ModelConfig) -> RandomBase {
        let description = config.describe();
        let linear = description
            .linears()
            .iter()
            .map(|l| (l.weight_name(), vec![l.out_features, l.in_features]))
            .collect();
        let infos = description
            .tensors()
            .into_iter()
            .map(|t| TensorInfo {
                name: t.name,
                dtype: DType::BF16,
                shape: t.shape,
            })
            .collect();
        RandomBase {
            infos,
            linear,
            packed: Mutex::new(HashMap::new()),
        }
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.infos
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| Error::Invalid(format!("random base: no tensor {name}")))
    }
}

/// A random nf4 + double-quant weight of `shape`.
fn random_quantized(shape: &[usize]) -> Quantized4 {
    let numel: usize = shape.iter().product();
    let blocks = numel.div_ceil(64);
    let mut fill = Filler(0x9E37_79B9_7F4A_7C15 ^ numel as u64);
    let nested = blocks.div_ceil(NESTED_BLOCKSIZE);
    Quantized4 {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        shape: shape.to_vec(),
        dtype: DType::BF16,
        packed: fill.bytes(numel.div_ceil(2)),
        absmax: Absmax::Double(DoubleQuant {
            quantized: fill.bytes(blocks),
            nested_absmax: vec![0.01; nested],
            offset: 0.02,
            nested_blocksize: NESTED_BLOCKSIZE,
        }),
    }
}

impl TensorSource for RandomBase {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.infos.clone()
    }

    fn read(&self, name: &str) -> Result<RawTensor> {
        let info = self.info(name)?;
        let numel: usize = info.shape.iter().product();
        let is_norm = name.contains("layernorm") || name.contains("ln_f");
        let values: Vec<bf16> = if is_norm {
            vec![bf16::from_f32(if name.ends_with(".weight") { 1.0 } else { 0.0 }); numel]
        } else {
            // A random block repeated: the embedding alone has a billion values.
            let mut fill = Filler(0xD1B5_4A32_D192_ED03);
            let block: Vec<bf16> = (0..numel.min(1 << 20))
                .map(|_| bf16::from_f32(fill.uniform(0.02)))
                .collect();
            block.iter().copied().cycle().take(numel).collect()
        };
        Ok(RawTensor {
            dtype: DType::BF16,
            shape: info.shape.clone(),
            data: bytemuck::cast_slice(&values).to_vec(),
        })
    }

    fn file_of(&self, _name: &str) -> Option<String> {
        Some("random weights".into())
    }

    fn quantized(&self, name: &str) -> Option<Result<Quantized4>> {
        let shape = self.linear.get(name)?;
        let mut cache = match self.packed.lock() {
            Ok(c) => c,
            Err(_) => return Some(Err(Error::Invalid("random weight cache poisoned".into()))),
        };
        Some(Ok(cache
            .entry(shape.clone())
            .or_insert_with(|| random_quantized(shape))
            .clone()))
    }
}

/// One measured configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchConfig {
    pub batch: usize,
    pub seq: usize,
    pub gradient_checkpointing: bool,
}

impl std::fmt::Display for BenchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}:{}",
            self.batch,
            self.seq,
            if self.gradient_checkpointing {
                "gc"
            } else {
                "nogc"
            }
        )
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    /// Per GPU.
    pub config: String,
    /// GPUs (data-parallel ranks) the step ran on.
    pub world_size: usize,
    /// The slowest rank's median step (a step ends at the all-reduce, which waits for all).
    pub step_s_median: f64,
    /// Tokens per second over all GPUs.
    pub tok_s: f64,
    pub tok_s_per_gpu: f64,
    /// Median time of the gradient all-reduce, the slowest rank's (data-parallel only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_ms_median: Option<f64>,
    /// Peak of the device memory this run allocated (weights included), as
    /// `torch.cuda.max_memory_allocated` counts it.
    pub peak_alloc_gib: f64,
    /// Device memory in use at the end (CUDA context and libraries included).
    pub device_used_gib: f64,
    pub loss: f64,
    /// tok/s of one GPU at the card's bf16 rate if every FLOP of 6·N (recomputation) or 4·N per token ran.
    pub floor_tok_s: f64,
    pub fraction_of_floor: f64,
}

/// Measures `configs` on `gpu` with `layers` BLOOM-7b1 blocks; `bf16_flops` is the card's bf16
/// rate for the floor; `ranks` are the data-parallel ranks the steps run on.
pub fn run(
    gpu: &Gpu,
    ranks: &dyn Collective,
    layers: usize,
    configs: &[BenchConfig],
    steps: usize,
    bf16_flops: f64,
    report: &mut dyn FnMut(&BenchResult),
) -> Result<Vec<BenchResult>> {
    let config = bloom_7b1(layers)?;
    let base = RandomBase::new(&config);
    let lora = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.05,
        use_rslora: false,
        target_modules: TargetModules::Names(vec!["query_key_value".into()]),
    };
    let setup = LoraSetup {
        config: lora,
        init: LoraInit::Random { seed: 0 },
    };
    let options = CudaOptions {
        precision: Precision::Bf16,
        gradient_checkpointing: true,
    };
    let mut model = CudaModel::load(gpu, &config, &base, Some(&setup), options)?;
    let params = BLOOM_7B1_PARAMS * layers as f64 / 30.0;
    let mut results = Vec::new();
    for c in configs {
        model.set_gradient_checkpointing(c.gradient_checkpointing);
        let n = c.batch * c.seq;
        let mut fill = Filler(n as u64 + 1);
        let ids: Vec<u32> = (0..n).map(|_| 4 + (fill.next() % 249_996) as u32).collect();
        let labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if i % c.seq < c.seq / 2 {
                    IGNORE_INDEX
                } else {
                    i64::from(id)
                }
            })
            .collect();
        let batch = Batch {
            batch_size: c.batch,
            seq_len: c.seq,
            input_ids: ids,
            attention_mask: vec![1; n],
            labels,
        };
        let gpu_batch = GpuBatch::upload(gpu, &batch, model.vocab_size())?;
        gpu.sync()?;
        gpu.reset_peak();
        let (mut times, mut allreduce_times) = (Vec::new(), Vec::new());
        let mut loss = f64::NAN;
        let data_parallel = ranks.world_size() > 1;
        for step in 0..steps + 2 {
            let started = Instant::now();
            model.zero_grad()?;
            let scale = 1.0 / ranks.world_size() as f32;
            loss = model.forward_backward(&gpu_batch, scale, step as u64)?;
            if data_parallel {
                let (ptr, len) = model.gradient_buffer();
                allreduce_times.push(ranks.sum_device_f32(ptr, len)?);
            }
            model.clip_grad_norm(0.0)?;
            model.adamw_step(AdamWParams::with_weight_decay(0.0), 2e-4)?;
            gpu.sync()?;
            times.push(started.elapsed().as_secs_f64());
        }
        let allreduce_ms: Vec<f64> = allreduce_times
            .iter()
            .skip(2)
            .map(|d: &Duration| d.as_secs_f64() * 1e3)
            .collect();
        // The slowest rank's figures: the run goes at its pace.
        let mut slowest = [
            median(&times[2..]),
            if data_parallel {
                median(&allreduce_ms)
            } else {
                0.0
            },
        ];
        max_over_ranks(ranks, &mut slowest)?;
        let [step_s_median, allreduce_median] = slowest;
        let memory = gpu.memory()?;
        let flops_per_token = if c.gradient_checkpointing { 6.0 } else { 4.0 } * params;
        let tok_s = (n * ranks.world_size()) as f64 / step_s_median;
        let floor = bf16_flops / flops_per_token;
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let r = BenchResult {
            config: c.to_string(),
            world_size: ranks.world_size(),
            step_s_median,
            tok_s,
            tok_s_per_gpu: tok_s / ranks.world_size() as f64,
            allreduce_ms_median: data_parallel.then_some(allreduce_median),
            peak_alloc_gib: gib(memory.peak_bytes),
            device_used_gib: gib(memory.device_used_bytes),
            loss,
            floor_tok_s: floor,
            fraction_of_floor: tok_s / ranks.world_size() as f64 / floor,
        };
        report(&r);
        results.push(r);
    }
    Ok(results)
}

/// Replaces each of `values` (non-negative) by its maximum over the ranks: the ranks' values are
/// gathered by summing a vector in which each rank fills its own slots.
fn max_over_ranks(ranks: &dyn Collective, values: &mut [f64]) -> Result<()> {
    let world = ranks.world_size();
    let mut gathered = vec![0.0; values.len() * world];
    for (i, v) in values.iter().enumerate() {
        gathered[i * world + ranks.rank()] = *v;
    }
    ranks.sum(&mut gathered)?;
    for (i, v) in values.iter_mut().enumerate() {
        *v = gathered[i * world..(i + 1) * world]
            .iter()
            .copied()
            .fold(0.0, f64::max);
    }
    Ok(())
}

/// The median of timings (the upper one of an even count); `values` is not empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
