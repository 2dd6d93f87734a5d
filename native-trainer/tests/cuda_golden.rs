//! The CUDA path against the CPU path on the golden tiny models (BLOOM, LLaMA, Qwen2; fp32,
//! nf4 and fp4 checkpoints): loss and every LoRA gradient of one micro-batch, in the f32 check
//! mode (rel. <= 1e-4) and in bf16 (rel. <= 2e-2), with and without recomputation; the
//! evaluation loss; and one AdamW step against train/optimizer.rs.
//!
//! Skipped, with a printed reason, where no CUDA device opens. Relative error = max|gpu - cpu| /
//! max|cpu| per tensor, the worst over all tensors; `--nocapture` prints them.
//! `QLORA_FIXTURES` overrides the fixtures directory (for a test binary run on another machine).

use candle_core::{Device, Tensor};
use qlora_core::arch::{Architecture, LoraConfig, ModelConfig, PeftNaming, TargetModules};
use qlora_core::checkpoint::bnb4bit::Dequantizing;
use qlora_core::checkpoint::{open_checkpoint, SafetensorsFile, TensorSource};
use qlora_core::data::Batch;
use qlora_trainer::cpu::{backward, causal_lm_loss, LoraInit, LoraSetup, Mode, Model};
use qlora_trainer::cuda::{CudaModel, CudaOptions, Gpu, GpuBatch, Precision};
use qlora_trainer::train::optimizer::{clip_grad_norm, AdamW, AdamWParams};

mod common;
use common::{golden, gpu, Prefixed};

fn i64s(file: &SafetensorsFile, name: &str) -> (Vec<i64>, Vec<usize>) {
    let raw = file.read(name).unwrap();
    let v = raw
        .data
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (v, raw.shape)
}

/// Norm-wise relative error `||ours - reference|| / ||reference||`.
fn relative_norm(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let sq = |v: f64| v * v;
    let diff: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| sq(f64::from(a - b)))
        .sum();
    let scale: f64 = reference.iter().map(|b| sq(f64::from(*b))).sum();
    (diff / scale.max(f64::MIN_POSITIVE)).sqrt()
}

/// Element-wise relative error `max|ours - reference| / max|reference|`.
fn relative(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let diff = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max);
    let scale = reference
        .iter()
        .map(|b| f64::from(b.abs()))
        .fold(0.0, f64::max);
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

struct Case {
    model_dir: &'static str,
    reference: &'static str,
    targets: &'static [&'static str],
}

const LLAMA_TARGETS: &[&str] = Architecture::Llama.default_lora_targets();

const CASES: &[Case] = &[
    Case {
        model_dir: "tiny-bloom",
        reference: "tiny_bloom_reference.safetensors",
        targets: &["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    },
    Case {
        model_dir: "tiny-bloom-nf4",
        reference: "tiny_bloom_reference.safetensors",
        targets: &["query_key_value"],
    },
    Case {
        model_dir: "tiny-bloom-fp4",
        reference: "tiny_bloom_reference.safetensors",
        targets: &["query_key_value"],
    },
    Case {
        model_dir: "llama/tiny-llama",
        reference: "llama/tiny-llama_reference.safetensors",
        targets: LLAMA_TARGETS,
    },
    Case {
        model_dir: "llama/tiny-llama-nf4",
        reference: "llama/tiny-llama_reference.safetensors",
        targets: LLAMA_TARGETS,
    },
    Case {
        model_dir: "llama/tiny-qwen2",
        reference: "llama/tiny-qwen2_reference.safetensors",
        targets: LLAMA_TARGETS,
    },
    Case {
        model_dir: "llama/tiny-qwen2-fp4",
        reference: "llama/tiny-qwen2_reference.safetensors",
        targets: LLAMA_TARGETS,
    },
];

struct Outcome {
    loss: f64,
    /// (module, dA, dB)
    grads: Vec<(String, Vec<f32>, Vec<f32>)>,
}

impl Case {
    fn config(&self) -> ModelConfig {
        ModelConfig::load(&golden(&format!("{}/config.json", self.model_dir))).unwrap()
    }

    fn checkpoint(&self) -> Box<dyn TensorSource> {
        let source = open_checkpoint(&golden(self.model_dir)).unwrap();
        if self.config().quantization.is_some() {
            Box::new(Dequantizing::new(source))
        } else {
            source
        }
    }

    fn lora(&self, targets: &[&str]) -> LoraConfig {
        LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::Names(targets.iter().map(|s| s.to_string()).collect()),
        }
    }

    /// A batch with padding on the right of row 1 and the reference's labels; the first LoRA
    /// init from the reference file; B made non-zero where the reference has none (so that A
    /// gets a gradient) is not needed: the golden B values are random.
    fn batch(&self, reference: &SafetensorsFile) -> Batch {
        let (ids, shape) = i64s(reference, "input_ids");
        let (labels, _) = i64s(reference, "labels");
        let (b, t) = (shape[0], shape[1]);
        let mask = if reference
            .tensor_infos()
            .iter()
            .any(|i| i.name == "attention_mask")
        {
            i64s(reference, "attention_mask")
                .0
                .iter()
                .map(|&m| m as u32)
                .collect()
        } else {
            vec![1u32; b * t]
        };
        Batch {
            batch_size: b,
            seq_len: t,
            input_ids: ids.iter().map(|&i| i as u32).collect(),
            attention_mask: mask,
            labels,
        }
    }

    fn cpu(&self, setup: &LoraSetup<'_>, batch: &Batch) -> (Outcome, Model) {
        let model = Model::load(&self.config(), &self.checkpoint(), Some(setup)).unwrap();
        let shape = (batch.batch_size, batch.seq_len);
        let ids = Tensor::from_vec(batch.input_ids.clone(), shape, &Device::Cpu).unwrap();
        let mask = Tensor::from_vec(batch.attention_mask.clone(), shape, &Device::Cpu).unwrap();
        let labels = Tensor::from_vec(batch.labels.clone(), shape, &Device::Cpu).unwrap();
        let logits = model.forward(&ids, Some(&mask), &mut Mode::Eval).unwrap();
        let loss = causal_lm_loss(&logits, &labels).unwrap();
        let grads = backward(&loss).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let grads = model
            .lora_gradients(&grads)
            .unwrap()
            .iter()
            .map(|g| (g.module.to_string(), flat(&g.a), flat(&g.b)))
            .collect();
        (
            Outcome {
                loss: f64::from(loss.to_scalar::<f32>().unwrap()),
                grads,
            },
            model,
        )
    }

    fn run(&self, gpu: &Gpu) {
        let reference = SafetensorsFile::open(&golden(self.reference)).unwrap();
        let init = Prefixed {
            inner: &reference,
            prefix: "lora_init.",
        };
        let available: Vec<&str> = self
            .targets
            .iter()
            .copied()
            .filter(|t| {
                init.tensor_infos()
                    .iter()
                    .any(|i| i.name.contains(&format!(".{t}.")))
            })
            .collect();
        let setup = LoraSetup {
            config: self.lora(&available),
            init: LoraInit::FromSource {
                source: &init,
                naming: PeftNaming::Live("default".into()),
            },
        };
        let batch = self.batch(&reference);
        let (cpu, cpu_model) = self.cpu(&setup, &batch);
        for (precision, checkpointing, tolerance) in [
            (Precision::F32, false, 1e-4),
            (Precision::F32, true, 1e-4),
            (Precision::Bf16, false, 2e-2),
            (Precision::Bf16, true, 2e-2),
        ] {
            let options = CudaOptions {
                precision,
                gradient_checkpointing: checkpointing,
            };
            let mut model = CudaModel::load(
                gpu,
                &self.config(),
                &self.checkpoint(),
                Some(&setup),
                options,
            )
            .unwrap();
            let gb = GpuBatch::upload(gpu, &batch, model.vocab_size()).unwrap();
            model.zero_grad().unwrap();
            let loss = model.forward_backward(&gb, 1.0, 0).unwrap();
            let eval_loss = model.loss(&gb).unwrap();
            let grads = model.lora_gradients().unwrap();
            let loss_rel = (loss - cpu.loss).abs() / cpu.loss.abs();
            let eval_rel = (eval_loss - cpu.loss).abs() / cpu.loss.abs();
            assert_eq!(
                grads.len(),
                cpu.grads.len(),
                "one gradient pair per adapter"
            );
            let (mut worst, mut worst_norm) = (0f64, 0f64);
            for (g, (cm, ca, cb)) in grads.iter().zip(&cpu.grads) {
                let (m, a, b) = (&g.module, &g.a, &g.b);
                assert_eq!(m, cm);
                worst = worst.max(relative(a, ca)).max(relative(b, cb));
                worst_norm = worst_norm
                    .max(relative_norm(a, ca))
                    .max(relative_norm(b, cb));
            }
            println!(
                "{} {precision:?} checkpointing={checkpointing}: loss {loss:.6} (cpu {:.6}) rel {loss_rel:.2e}, eval rel {eval_rel:.2e}, \
                 LoRA grads rel {worst:.2e} element-wise, {worst_norm:.2e} norm-wise (worst of {} adapters)",
                self.model_dir,
                cpu.loss,
                grads.len()
            );
            assert!(
                loss_rel <= tolerance,
                "{}: loss rel {loss_rel}",
                self.model_dir
            );
            assert!(
                eval_rel <= tolerance,
                "{}: eval loss rel {eval_rel}",
                self.model_dir
            );
            // bf16: the norm-wise error against the tolerance; a single element of a tensor
            // whose values are all small (a dense fp32 base rounded to bf16) may reach 1.5x it.
            let grad_error = match precision {
                Precision::F32 => worst,
                Precision::Bf16 => worst_norm.max(worst / 1.5),
            };
            assert!(
                grad_error <= tolerance,
                "{}: gradient rel {worst}",
                self.model_dir
            );
            if precision == Precision::F32 && !checkpointing {
                self.check_adamw(&mut model, &cpu, &cpu_model);
            }
        }
    }

    /// One clipped AdamW step on the GPU against train/optimizer.rs on the CPU gradients.
    fn check_adamw(&self, model: &mut CudaModel, cpu: &Outcome, cpu_model: &Model) {
        let params = AdamWParams::with_weight_decay(0.01);
        let gpu_norm = model.clip_grad_norm(0.5).unwrap();
        model.adamw_step(params, 1e-3).unwrap();
        let mut grads: Vec<Vec<f32>> = cpu
            .grads
            .iter()
            .flat_map(|(_, a, b)| [a.clone(), b.clone()])
            .collect();
        let cpu_norm = clip_grad_norm(&mut grads, 0.5);
        let mut values: Vec<Vec<f32>> = cpu_model
            .lora_adapters()
            .iter()
            .flat_map(|a| [&a.a, &a.b])
            .map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        let mut opt = AdamW::new(&values.iter().map(Vec::len).collect::<Vec<_>>());
        opt.step(params, &mut values, &grads, 1e-3);
        let after: Vec<Vec<f32>> = model
            .lora_pairs()
            .unwrap()
            .into_iter()
            .flat_map(|(_, p)| [p.a, p.b])
            .collect();
        let worst = after
            .iter()
            .zip(&values)
            .map(|(g, c)| relative(g, c))
            .fold(0.0, f64::max);
        let norm_rel = (gpu_norm - cpu_norm).abs() / cpu_norm;
        println!(
            "{}: AdamW step max rel {worst:.2e}, grad norm rel {norm_rel:.2e}",
            self.model_dir
        );
        assert!(
            worst <= 1e-4 && norm_rel <= 1e-4,
            "AdamW {worst}, norm {norm_rel}"
        );
    }
}

#[test]
fn cuda_matches_cpu_on_golden_models() {
    let Some(gpu) = gpu() else { return };
    println!("device: {}", gpu.describe());
    for case in CASES {
        case.run(&gpu);
    }
}

#[test]
fn opening_a_missing_device_is_a_clear_error() {
    let Some(_gpu) = gpu() else { return };
    let err = Gpu::open(1000)
        .err()
        .expect("device 1000 does not exist")
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn an_impossible_allocation_names_its_size_and_the_flags() {
    let Some(gpu) = gpu() else { return };
    let err = gpu
        .alloc(1 << 50, "a test buffer")
        .err()
        .expect("1 PiB does not fit")
        .to_string();
    println!("{err}");
    assert!(
        err.contains("out of GPU memory") && err.contains("--batch_size"),
        "{err}"
    );
}

/// 200 optimizer steps of the training loop (train::train) with the CUDA model against the CPU
/// model, on tiny models with the same data, seed and options (LoRA dropout 0, so that both see
/// the same computation): the per-step losses and the final validation loss must track each
/// other.
#[test]
fn a_200_step_training_run_tracks_the_cpu_loop() {
    use qlora_core::data::Example;
    use qlora_core::peft::AdapterConfig;
    use qlora_trainer::train::schedule::ScheduleKind;
    use qlora_trainer::train::{train, CpuTrainable, TrainOptions};
    use rand::{Rng, SeedableRng};

    let Some(gpu) = gpu() else { return };
    for case in [&CASES[1], &CASES[4]] {
        let config = case.config();
        let vocab = config.vocab_size();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Short "prompt + answer" sequences drawn from a few fixed patterns, so the loss can fall.
        let patterns: Vec<Vec<u32>> = (0..6)
            .map(|_| (0..12).map(|_| rng.random_range(1..vocab as u32)).collect())
            .collect();
        let example = |rng: &mut rand::rngs::StdRng| {
            let p = &patterns[rng.random_range(0..patterns.len())];
            let len = rng.random_range(8..=12);
            let ids = p[..len].to_vec();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < 3 { -100 } else { i64::from(t) })
                .collect();
            Example {
                input_ids: ids,
                labels,
                line: 0,
            }
        };
        let train_set: Vec<Example> = (0..64).map(|_| example(&mut rng)).collect();
        let val_set: Vec<Example> = (0..8).map(|_| example(&mut rng)).collect();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::Names(
                case.targets.iter().map(|s| s.to_string()).collect(),
            ),
        };
        let adapter_config = AdapterConfig::new(lora.clone(), None);
        let setup = LoraSetup {
            config: lora,
            init: LoraInit::Random { seed: 3 },
        };
        let options = TrainOptions {
            epochs: 1,
            max_steps: Some(200),
            batch_size: 4,
            gradient_steps: 2,
            world_size: 1,
            schedule: ScheduleKind::Linear,
            lr: 2e-3,
            warmup_steps: 10,
            adamw: AdamWParams::with_weight_decay(0.01),
            max_grad_norm: 1.0,
            eval_steps: Some(100),
            save_steps: None,
            save_total_limit: None,
            resume_from: None,
            run_identity: Default::default(),
            seed: 11,
            pad_id: 0,
            ignore_pad_token_for_loss: true,
        };
        let cpu_dir = tempfile::tempdir().unwrap();
        let mut cpu_losses = Vec::new();
        let cpu_model = Model::load(&config, &case.checkpoint(), Some(&setup)).unwrap();
        let cpu = train(
            &mut CpuTrainable::new(&cpu_model).unwrap(),
            &train_set,
            Some(&val_set),
            &options,
            &adapter_config,
            cpu_dir.path(),
            &mut |r| cpu_losses.push(r.loss),
        )
        .unwrap();
        for (precision, tolerance) in [(Precision::F32, 1e-2), (Precision::Bf16, 1e-1)] {
            let dir = tempfile::tempdir().unwrap();
            let mut losses = Vec::new();
            let options_cuda = CudaOptions {
                precision,
                gradient_checkpointing: precision == Precision::Bf16,
            };
            let mut model = CudaModel::load(
                &gpu,
                &config,
                &case.checkpoint(),
                Some(&setup),
                options_cuda,
            )
            .unwrap();
            let summary = train(
                &mut model,
                &train_set,
                Some(&val_set),
                &options,
                &adapter_config,
                dir.path(),
                &mut |r| losses.push(r.loss),
            )
            .unwrap();
            let worst = losses
                .iter()
                .zip(&cpu_losses)
                .map(|(g, c)| (g - c).abs() / c.abs())
                .fold(0.0, f64::max);
            let (gv, cv) = (summary.best.unwrap().val_loss, cpu.best.unwrap().val_loss);
            println!(
                "{} {precision:?}: 200 steps, loss {:.4} -> {:.4} (cpu {:.4} -> {:.4}), max per-step rel {worst:.2e}, best val {gv:.4} (cpu {cv:.4})",
                case.model_dir, losses[0], losses[199], cpu_losses[0], cpu_losses[199]
            );
            assert_eq!(losses.len(), 200);
            assert!(
                worst <= tolerance,
                "{}: loss curve rel {worst}",
                case.model_dir
            );
            assert!((gv - cv).abs() / cv <= tolerance);
            for d in ["final", "best_model", "train_log.jsonl"] {
                assert!(dir.path().join(d).exists(), "{d} written");
            }
        }
    }
}
