//! The training loop: LoRA matrices of a CPU [`Model`] trained with AdamW on shuffled
//! micro-batches, gradient accumulation, a warmup + decay schedule, periodic validation, and
//! the adapters written as PEFT directories (`best_model/`, `final/`, `checkpoint-<step>/`).

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use qlora_core::data::Example;
use qlora_core::peft::AdapterConfig;
use qlora_core::{Error, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::adapter::{model_adapter, save_adapter};
use super::batches::{batches_per_epoch, epoch_batches, BatchTensors};
use super::log::{StepRecord, TrainLog};
use super::optimizer::{clip_grad_norm, AdamW, AdamWParams};
use super::schedule::{LrSchedule, ScheduleKind};
use crate::cpu::{backward, causal_lm_loss, compute_error, Mode, Model};

/// The log file in the output directory.
pub const LOG_FILE: &str = "train_log.jsonl";
/// The adapter with the lowest validation loss so far.
pub const BEST_DIR: &str = "best_model";
/// The adapter after the last step.
pub const FINAL_DIR: &str = "final";

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Passes over the training data; ignored when `max_steps` is given.
    pub epochs: usize,
    /// Optimizer steps to take, as many epochs as that needs (transformers' `max_steps`).
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged into one optimizer step.
    pub gradient_steps: usize,
    pub schedule: ScheduleKind,
    pub lr: f64,
    pub warmup_steps: usize,
    pub adamw: AdamWParams,
    /// Global gradient-norm clipping (`<= 0`: none).
    pub max_grad_norm: f64,
    /// Validate every this many steps (and always after the last one).
    pub eval_steps: Option<usize>,
    /// Write `checkpoint-<step>/` every this many steps.
    pub save_steps: Option<usize>,
    /// Seeds the shuffle and the dropout masks (the adapters' initial values are seeded when the
    /// model is built).
    pub seed: u64,
    pub pad_id: u32,
    pub ignore_pad_token_for_loss: bool,
}

impl TrainOptions {
    /// Optimizer steps in one epoch of `examples`.
    pub fn steps_per_epoch(&self, examples: usize) -> usize {
        batches_per_epoch(examples, self.batch_size).div_ceil(self.gradient_steps)
    }

    /// Optimizer steps the run takes.
    pub fn total_steps(&self, examples: usize) -> usize {
        self.max_steps
            .unwrap_or(self.epochs * self.steps_per_epoch(examples))
    }

    pub(crate) fn check(&self) -> Result<()> {
        let positive = [
            ("batch_size", Some(self.batch_size)),
            ("gradient_steps", Some(self.gradient_steps)),
            ("epoch", self.max_steps.is_none().then_some(self.epochs)),
            ("max_steps", self.max_steps),
            ("eval_steps", self.eval_steps),
            ("save_steps", self.save_steps),
        ];
        for (name, value) in positive {
            if value == Some(0) {
                return Err(Error::Invalid(format!("{name} must be at least 1")));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Invalid(format!(
                "the learning rate must be positive, found {}",
                self.lr
            )));
        }
        Ok(())
    }
}

/// The validation loss at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub step: usize,
    pub val_loss: f64,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub trainable_params: usize,
    pub steps: usize,
    pub epochs: f64,
    pub seconds: f64,
    /// Real tokens trained on.
    pub tokens: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    /// The lowest validation loss (its adapter is `best_model/`); `None` without validation data.
    pub best: Option<Evaluation>,
}

/// Mean loss per predicted token over `examples` (no dropout), in batches of `batch_size`.
pub fn validation_loss(
    model: &Model,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    ignore_pad_token_for_loss: bool,
) -> Result<f64> {
    let (mut weighted, mut targets) = (0.0, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = BatchTensors::new(&refs, pad_id, ignore_pad_token_for_loss)?;
        let logits = model.forward(
            &batch.input_ids,
            Some(&batch.attention_mask),
            &mut Mode::Eval,
        )?;
        let loss = scalar(&causal_lm_loss(&logits, &batch.labels)?)?;
        weighted += loss * batch.targets as f64;
        targets += batch.targets;
    }
    Ok(weighted / targets.max(1) as f64)
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_scalar::<f32>().map(f64::from).map_err(compute_error)
}

pub(crate) fn not_finite(what: &str, value: f64, step: usize, epoch: usize) -> Error {
    Error::Invalid(format!(
        "{what} is {value} at step {step} (epoch {}): training diverged; try a lower --lr",
        epoch + 1
    ))
}

/// The LoRA matrices as the optimizer sees them: the model's Vars and f32 copies of their values.
struct Parameters<'m> {
    vars: Vec<&'m Var>,
    values: Vec<Vec<f32>>,
}

impl<'m> Parameters<'m> {
    fn of(model: &'m Model) -> Result<Parameters<'m>> {
        let vars: Vec<&Var> = model
            .lora_adapters()
            .into_iter()
            .flat_map(|a| [&a.a, &a.b])
            .collect();
        let values = vars
            .iter()
            .map(|v| flat(v.as_tensor()))
            .collect::<Result<_>>()?;
        Ok(Parameters { vars, values })
    }

    fn lengths(&self) -> Vec<usize> {
        self.values.iter().map(Vec::len).collect()
    }

    /// Copies the updated values into the model.
    fn store(&self) -> Result<()> {
        for (var, values) in self.vars.iter().zip(&self.values) {
            let t = Tensor::from_slice(values, var.as_tensor().dims(), &Device::Cpu);
            t.and_then(|t| var.set(&t)).map_err(compute_error)?;
        }
        Ok(())
    }
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(compute_error)
}

/// Adds the gradients of one micro-batch's loss into `sums` (parameter order of [`Parameters`]).
fn accumulate(model: &Model, loss: &Tensor, sums: &mut [Vec<f32>]) -> Result<()> {
    let grads = backward(loss)?;
    let pairs = model.lora_gradients(&grads)?;
    let grads = pairs.iter().flat_map(|g| [&g.a, &g.b]);
    for (sum, grad) in sums.iter_mut().zip(grads) {
        sum.iter_mut().zip(flat(grad)?).for_each(|(s, g)| *s += g);
    }
    Ok(())
}

/// Trains the LoRA matrices of `model` on `train`, validating on `validation` when given, and
/// writes the log and the adapters into `out_dir` (which must exist). `progress` is told of
/// every step.
pub fn train(
    model: &Model,
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
    let schedule = LrSchedule {
        kind: options.schedule,
        peak_lr: options.lr,
        warmup_steps: options.warmup_steps,
        total_steps,
    };
    let mut params = Parameters::of(model)?;
    let trainable_params = params.lengths().iter().sum();
    let mut optimizer = AdamW::new(options.adamw, &params.lengths());
    let mut shuffle_rng = StdRng::seed_from_u64(options.seed);
    let mut dropout_rng = StdRng::seed_from_u64(options.seed.wrapping_add(1));
    let mut log = TrainLog::create(&out_dir.join(LOG_FILE))?;
    let started = Instant::now();
    let (mut step, mut epoch, mut tokens_total) = (0usize, 0usize, 0usize);
    let (mut first_loss, mut last_loss) = (None, f64::NAN);
    let mut best: Option<Evaluation> = None;

    while step < total_steps {
        let batches = epoch_batches(train.len(), options.batch_size, &mut shuffle_rng);
        let groups = batches.chunks(options.gradient_steps);
        let mut micro_done = 0;
        for group in groups {
            let step_started = Instant::now();
            let mut grads: Vec<Vec<f32>> = params.lengths().iter().map(|&n| vec![0.0; n]).collect();
            let (mut loss_sum, mut tokens) = (0.0, 0);
            for indices in group {
                let examples: Vec<&Example> = indices.iter().map(|&i| &train[i]).collect();
                let batch = BatchTensors::new(
                    &examples,
                    options.pad_id,
                    options.ignore_pad_token_for_loss,
                )?;
                let logits = model.forward(
                    &batch.input_ids,
                    Some(&batch.attention_mask),
                    &mut Mode::Train(&mut dropout_rng),
                )?;
                let loss = causal_lm_loss(&logits, &batch.labels)?;
                let value = scalar(&loss)?;
                if !value.is_finite() {
                    return Err(not_finite("the training loss", value, step + 1, epoch));
                }
                accumulate(model, &loss, &mut grads)?;
                loss_sum += value;
                tokens += batch.tokens;
            }
            let micro = group.len() as f32;
            grads.iter_mut().flatten().for_each(|g| *g /= micro);
            let grad_norm = clip_grad_norm(&mut grads, options.max_grad_norm);
            if !grad_norm.is_finite() {
                return Err(not_finite("the gradient norm", grad_norm, step + 1, epoch));
            }
            let lr = schedule.lr(step);
            optimizer.step(&mut params.values, &grads, lr);
            params.store()?;
            // Speed of the training step alone, validation and saving excluded.
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
                        save_adapter(
                            &model_adapter(model, adapter_config)?,
                            &out_dir.join(BEST_DIR),
                        )?;
                    }
                    Some(v)
                }
                None => None,
            };
            if options.save_steps.is_some_and(|n| step.is_multiple_of(n)) {
                let dir = out_dir.join(format!("checkpoint-{step}"));
                save_adapter(&model_adapter(model, adapter_config)?, &dir)?;
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
    save_adapter(
        &model_adapter(model, adapter_config)?,
        &out_dir.join(FINAL_DIR),
    )?;
    let epochs = step as f64 / options.steps_per_epoch(train.len()) as f64;
    Ok(Summary {
        trainable_params,
        steps: step,
        epochs,
        seconds: started.elapsed().as_secs_f64(),
        tokens: tokens_total,
        first_loss: first_loss.unwrap_or(f64::NAN),
        last_loss,
        best,
    })
}
