//! The training loop on the GPU: the CPU loop's schedule, batching, gradient accumulation,
//! clipping, validation, log and adapter outputs (train/*), with the forward and backward
//! passes and AdamW of a [`CudaModel`].

use std::path::Path;
use std::time::Instant;

use qlora_core::data::{collate, Example};
use qlora_core::peft::AdapterConfig;
use qlora_core::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::batch::GpuBatch;
use super::model::CudaModel;
use crate::train::adapter::{adapter_from_pairs, save_adapter};
use crate::train::batches::epoch_batches;
use crate::train::log::{StepRecord, TrainLog};
use crate::train::trainer::{
    not_finite, Evaluation, Summary, TrainOptions, BEST_DIR, FINAL_DIR, LOG_FILE,
};

/// Mean loss per predicted token over `examples` (no dropout), in batches of `batch_size`.
pub fn validation_loss(
    model: &CudaModel,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    ignore_pad_token_for_loss: bool,
) -> Result<f64> {
    let (mut weighted, mut targets) = (0.0, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, ignore_pad_token_for_loss);
        let gpu_batch = match GpuBatch::upload(model.gpu(), &batch, model.vocab_size()) {
            Ok(b) => b,
            // A chunk with nothing to predict adds nothing to the mean.
            Err(_)
                if batch
                    .labels
                    .iter()
                    .all(|&l| l == qlora_core::data::IGNORE_INDEX) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        weighted += model.loss(&gpu_batch)? * gpu_batch.count as f64;
        targets += gpu_batch.count;
    }
    Ok(weighted / targets.max(1) as f64)
}

fn save(model: &CudaModel, config: &AdapterConfig, dir: &Path) -> Result<()> {
    save_adapter(&adapter_from_pairs(model.lora_pairs()?, config), dir)
}

/// Trains the LoRA matrices of `model` as [`crate::train::train`] trains a CPU model, writing the
/// same log and adapter directories into `out_dir` (which must exist).
pub fn train(
    model: &mut CudaModel,
    train: &[Example],
    validation: Option<&[Example]>,
    options: &TrainOptions,
    adapter_config: &AdapterConfig,
    out_dir: &Path,
    progress: &mut dyn FnMut(&StepRecord),
) -> Result<Summary> {
    options.check()?;
    if train.is_empty() {
        return Err(Error::Invalid("no training examples".into()));
    }
    let total_steps = options.total_steps(train.len());
    let schedule = options.lr_schedule(total_steps);
    let mut shuffle_rng = StdRng::seed_from_u64(options.seed);
    let mut dropout_rng = StdRng::seed_from_u64(options.seed.wrapping_add(1));
    let mut log = TrainLog::create(&out_dir.join(LOG_FILE))?;
    let started = Instant::now();
    let (mut step, mut epoch, mut tokens_total) = (0usize, 0usize, 0usize);
    let (mut first_loss, mut last_loss) = (None, f64::NAN);
    let mut best: Option<Evaluation> = None;

    while step < total_steps {
        let batches = epoch_batches(train.len(), options.batch_size, &mut shuffle_rng);
        let mut micro_done = 0;
        for group in batches.chunks(options.gradient_steps) {
            let step_started = Instant::now();
            model.zero_grad()?;
            let (mut loss_sum, mut tokens) = (0.0, 0);
            let micro = group.len() as f32;
            for indices in group {
                let examples: Vec<&Example> = indices.iter().map(|&i| &train[i]).collect();
                let batch = collate(&examples, options.pad_id, options.ignore_pad_token_for_loss);
                tokens += batch.attention_mask.iter().filter(|&&m| m != 0).count();
                let gpu_batch = GpuBatch::upload(model.gpu(), &batch, model.vocab_size())?;
                let value =
                    model.forward_backward(&gpu_batch, 1.0 / micro, dropout_rng.random())?;
                if !value.is_finite() {
                    return Err(not_finite("the training loss", value, step + 1, epoch));
                }
                loss_sum += value;
            }
            let grad_norm = model.clip_grad_norm(options.max_grad_norm)?;
            if !grad_norm.is_finite() {
                return Err(not_finite("the gradient norm", grad_norm, step + 1, epoch));
            }
            let lr = schedule.lr(step);
            model.adamw_step(options.adamw, lr)?;
            model.gpu().sync()?;
            let tokens_per_s = tokens as f64 / step_started.elapsed().as_secs_f64();
            step += 1;
            micro_done += group.len();
            tokens_total += tokens;
            let loss = loss_sum / f64::from(micro);
            first_loss.get_or_insert(loss);
            last_loss = loss;

            let eval_due =
                step == total_steps || options.eval_steps.is_some_and(|n| step.is_multiple_of(n));
            let val_loss = match validation.filter(|_| eval_due) {
                Some(examples) => {
                    let v = validation_loss(
                        model,
                        examples,
                        options.batch_size,
                        options.pad_id,
                        options.ignore_pad_token_for_loss,
                    )?;
                    if !v.is_finite() {
                        return Err(not_finite("the validation loss", v, step, epoch));
                    }
                    if best.is_none_or(|b| v < b.val_loss) {
                        best = Some(Evaluation { step, val_loss: v });
                        save(model, adapter_config, &out_dir.join(BEST_DIR))?;
                    }
                    Some(v)
                }
                None => None,
            };
            if options.save_steps.is_some_and(|n| step.is_multiple_of(n)) {
                save(
                    model,
                    adapter_config,
                    &out_dir.join(format!("checkpoint-{step}")),
                )?;
            }
            let record = StepRecord {
                step,
                epoch: epoch as f64 + micro_done as f64 / batches.len() as f64,
                loss,
                lr,
                grad_norm,
                tokens_per_s,
                val_loss,
            };
            log.write(&record)?;
            progress(&record);
            if step == total_steps {
                break;
            }
        }
        epoch += 1;
    }
    save(model, adapter_config, &out_dir.join(FINAL_DIR))?;
    Ok(Summary {
        trainable_params: model.trainable_params(),
        steps: step,
        epochs: step as f64 / options.steps_per_epoch(train.len()) as f64,
        seconds: started.elapsed().as_secs_f64(),
        tokens: tokens_total,
        first_loss: first_loss.unwrap_or(f64::NAN),
        last_loss,
        best,
    })
}
