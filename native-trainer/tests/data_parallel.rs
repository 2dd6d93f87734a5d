//! Data-parallel training against one process, on the CPU: two ranks (threads joined by an
//! in-memory sum standing in for NCCL) with --batch_size 2 and one micro-batch each per step
//! train the tiny BLOOM as one process with --batch_size 2 and --gradient_steps 2 does (the same
//! global batch and seed): the same data order, dropout masks, losses, gradient norms and
//! validation losses, up to the order of floating-point sums; only rank 0 writes files.

use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use qlora_core::arch::{LoraConfig, ModelConfig, TargetModules};
use qlora_core::checkpoint::SafetensorsFile;
use qlora_core::data::Example;
use qlora_core::peft::AdapterConfig;
use qlora_trainer::cpu::{LoraInit, LoraSetup, Model};
use qlora_trainer::train::log::StepRecord;
use qlora_trainer::train::optimizer::AdamWParams;
use qlora_trainer::train::schedule::ScheduleKind;
use qlora_trainer::train::{
    train_data_parallel, Collective, CpuTrainable, Run, SingleProcess, TrainOptions,
};
use rand::{Rng, SeedableRng};

mod common;

/// Ranks as threads of this process: sums through shared memory.
struct Threads {
    rank: usize,
    world_size: usize,
    shared: Arc<(Barrier, Mutex<Vec<f64>>)>,
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn sum(&self, values: &mut [f64]) -> qlora_core::Result<()> {
        let (barrier, total) = &*self.shared;
        // Everyone is here (and done reading the previous sum) before rank 0 clears it.
        barrier.wait();
        if self.rank == 0 {
            *total.lock().unwrap() = vec![0.0; values.len()];
        }
        barrier.wait();
        for (t, v) in total.lock().unwrap().iter_mut().zip(values.iter()) {
            *t += v;
        }
        barrier.wait();
        values.copy_from_slice(&total.lock().unwrap());
        Ok(())
    }

    fn sum_device_f32(&self, _ptr: u64, _len: usize) -> qlora_core::Result<Duration> {
        Err(qlora_core::Error::Invalid(
            "the thread ranks of this test have no GPU".into(),
        ))
    }
}

fn examples(count: usize, seed: u64, vocab: u32) -> Vec<Example> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|line| {
            let len = rng.random_range(6..=10);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(4..vocab)).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < 3 { -100 } else { i64::from(t) })
                .collect();
            Example {
                input_ids: ids,
                labels,
                line: line + 1,
            }
        })
        .collect()
}

fn options(gradient_steps: usize, world_size: usize) -> TrainOptions {
    TrainOptions {
        epochs: 1,
        max_steps: Some(7),
        batch_size: 2,
        gradient_steps,
        world_size,
        schedule: ScheduleKind::Linear,
        lr: 5e-3,
        warmup_steps: 1,
        adamw: AdamWParams::with_weight_decay(0.01),
        max_grad_norm: 1.0,
        eval_steps: Some(3),
        save_steps: Some(3),
        save_total_limit: None,
        resume_from: None,
        run_identity: Default::default(),
        seed: 9,
        pad_id: 3,
        ignore_pad_token_for_loss: true,
    }
}

/// Trains the tiny BLOOM (dropout on) as one rank of `ranks`, into `out_dir`; the step records.
fn train_rank(ranks: &dyn Collective, options: &TrainOptions, out_dir: &Path) -> Vec<StepRecord> {
    let model_dir = common::tiny_bloom();
    let config = ModelConfig::load(&model_dir.join("config.json")).unwrap();
    let weights = SafetensorsFile::open(&model_dir.join("model.safetensors")).unwrap();
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        use_rslora: false,
        target_modules: TargetModules::Names(vec!["query_key_value".into()]),
    };
    let setup = LoraSetup {
        config: lora.clone(),
        init: LoraInit::Random { seed: 5 },
    };
    let model = Model::load(&config, &weights, Some(&setup)).unwrap();
    let vocab = config.vocab_size() as u32;
    // 22 examples in micro-batches of 2: 11 micro-batches, the last step of the epoch has one.
    let (train, validation) = (examples(22, 1, vocab), examples(5, 2, vocab));
    let run = Run {
        train: &train,
        validation: Some(&validation),
        options,
        adapter_config: &AdapterConfig::new(lora, None),
        out_dir,
    };
    let mut records = Vec::new();
    let mut trainable = CpuTrainable::new(&model).unwrap();
    train_data_parallel(&mut trainable, &run, ranks, &mut |r| {
        records.push(r.clone())
    })
    .unwrap();
    records
}

#[test]
fn two_ranks_train_as_one_process_with_the_same_global_batch() {
    let single_dir = tempfile::tempdir().unwrap();
    let single = train_rank(&SingleProcess, &options(2, 1), single_dir.path());

    let shared = Arc::new((Barrier::new(2), Mutex::new(Vec::new())));
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let ranks: Vec<Vec<StepRecord>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let ranks = Threads {
                    rank,
                    world_size: 2,
                    shared: shared.clone(),
                };
                let dir = dirs[rank].path();
                scope.spawn(move || train_rank(&ranks, &options(1, 2), dir))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    // 11 micro-batches, 4 an optimizer step: 3 steps an epoch, 7 steps in 3 epochs.
    assert_eq!(single.len(), 7);
    let relative = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    let mut worst: f64 = 0.0;
    for rank in &ranks {
        assert_eq!(rank.len(), single.len());
        for (dp, one) in rank.iter().zip(&single) {
            assert_eq!((dp.step, dp.epoch, dp.lr), (one.step, one.epoch, one.lr));
            assert_eq!(dp.val_loss.is_some(), one.val_loss.is_some());
            worst = worst
                .max(relative(dp.loss, one.loss))
                .max(relative(dp.grad_norm, one.grad_norm))
                .max(relative(
                    dp.val_loss.unwrap_or(1.0),
                    one.val_loss.unwrap_or(1.0),
                ));
        }
    }
    println!("2 ranks vs 1 process: max relative difference {worst:.2e}");
    assert!(worst < 1e-5, "max relative difference {worst}");

    // Rank 0 wrote the log, checkpoints and adapters; rank 1 nothing.
    let names = |dir: &Path| {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(dirs[0].path()), names(single_dir.path()));
    assert!(names(dirs[0].path()).contains(&"final".to_string()));
    assert!(names(dirs[1].path()).is_empty());
}
