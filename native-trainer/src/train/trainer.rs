//! The training loop, one for every model ([`Trainable`]: the CPU and the CUDA one): LoRA
//! matrices trained with AdamW on shuffled micro-batches, gradient accumulation, a warmup + decay
//! schedule, periodic validation, and the adapters written as PEFT directories (`best_model/`,
//! `final/`). Every `save_steps` it writes a [checkpoint](super::checkpoint) from which a killed
//! run continues exactly; a non-finite loss, gradient norm or weight stops it before anything is
//! saved from that step.
//!
//! Data-parallel ([`train_data_parallel`]): each of the `W` ranks runs this loop on its own GPU.
//! A step takes `gradient_steps x W` consecutive micro-batches of the epoch's shuffled order (the
//! order a single process with `gradient_steps x W` would see: the same seed, the same data);
//! rank `r` computes the micro-batches `r, r + W, r + 2W, ...` of the step, each gradient scaled by
//! 1 / (the step's micro-batches), and the sum over the ranks (one all-reduce of the flat
//! gradient buffer, before clipping) is then the step's mean gradient, as on one GPU. Losses,
//! token counts and the validation loss (its batches split among the ranks the same way) are
//! summed over the ranks; every rank therefore takes the same decisions (clipping, the best
//! adapter, a diverged run), and only rank 0 writes files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use qlora_core::data::{collate, Example};
use qlora_core::peft::{AdapterConfig, LoraAdapter};
use qlora_core::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

use super::adapter::save_adapter;
use super::batches::{batches_per_epoch, epoch_batches, loss_targets, real_tokens};
use super::checkpoint::{
    checkpoint_name, examples_digest, recover_out_dir, save_checkpoint, BestState, Checkpoint,
    ExactF64, ParamSpec, RngState, TrainerState,
};
use super::collective::{Collective, SingleProcess};
use super::log::{StepRecord, TrainLog};
use super::optimizer::AdamWParams;
use super::schedule::{LrSchedule, ScheduleKind};
use super::trainable::Trainable;

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
    /// Examples per micro-batch (per GPU in a data-parallel run).
    pub batch_size: usize,
    /// Micro-batches (on each rank) whose gradients are averaged into one optimizer step.
    pub gradient_steps: usize,
    /// The processes of a data-parallel run (1: a single process); a step averages
    /// `gradient_steps x world_size` micro-batches.
    pub world_size: usize,
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
    /// Keep only the newest this many checkpoints (`None`: all).
    pub save_total_limit: Option<usize>,
    /// Continue from this checkpoint directory (one of `out_dir`'s) instead of starting afresh.
    pub resume_from: Option<PathBuf>,
    /// What identifies the run besides these options and the data (the base model and its
    /// quantization), as `"--flag": "value"`: stored in checkpoints, checked on resume.
    pub run_identity: BTreeMap<String, String>,
    /// Seeds the shuffle and the dropout masks (the adapters' initial values are seeded when the
    /// model is built).
    pub seed: u64,
    pub pad_id: u32,
    pub ignore_pad_token_for_loss: bool,
}

impl TrainOptions {
    /// Micro-batches of one optimizer step, over all ranks.
    pub fn micro_batches_per_step(&self) -> usize {
        self.gradient_steps * self.world_size
    }

    /// Optimizer steps in one epoch of `examples`.
    pub fn steps_per_epoch(&self, examples: usize) -> usize {
        batches_per_epoch(examples, self.batch_size).div_ceil(self.micro_batches_per_step())
    }

    /// The learning-rate schedule of a run of `total_steps` optimizer steps.
    pub fn lr_schedule(&self, total_steps: usize) -> LrSchedule {
        LrSchedule {
            kind: self.schedule,
            peak_lr: self.lr,
            warmup_steps: self.warmup_steps,
            total_steps,
        }
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
            ("world size", Some(self.world_size)),
            ("epoch", self.max_steps.is_none().then_some(self.epochs)),
            ("max_steps", self.max_steps),
            ("eval_steps", self.eval_steps),
            ("save_steps", self.save_steps),
            ("save_total_limit", self.save_total_limit),
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

    /// The run's identity in a checkpoint: [`TrainOptions::run_identity`], every option that
    /// changes the trained adapter, and digests of the data.
    fn identity(
        &self,
        adapter_config: &AdapterConfig,
        train: &[Example],
        validation: Option<&[Example]>,
    ) -> BTreeMap<String, String> {
        let lora = &adapter_config.lora;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.adamw;
        let entries = [
            (
                "optimizer steps (--max_steps or --epoch)",
                self.total_steps(train.len()).to_string(),
            ),
            ("--batch_size", self.batch_size.to_string()),
            ("--gradient_steps", self.gradient_steps.to_string()),
            ("--lr_scheduler", format!("{:?}", self.schedule)),
            ("--lr", format!("{:?}", self.lr)),
            ("--warmup_steps", self.warmup_steps.to_string()),
            ("--weight_decay", format!("{weight_decay:?}")),
            ("AdamW betas, eps", format!("{beta1:?}, {beta2:?}, {eps:?}")),
            ("--max_grad_norm", format!("{:?}", self.max_grad_norm)),
            (
                "--eval_steps",
                self.eval_steps.map_or("none".into(), |n| n.to_string()),
            ),
            ("--seed", self.seed.to_string()),
            ("pad token id", self.pad_id.to_string()),
            (
                "--ignore_pad_token_for_loss",
                self.ignore_pad_token_for_loss.to_string(),
            ),
            ("--lora_r", lora.r.to_string()),
            ("--lora_alpha", format!("{:?}", lora.alpha)),
            ("--lora_dropout", format!("{:?}", lora.dropout)),
            ("--use_rslora", lora.use_rslora.to_string()),
            ("--target_modules", format!("{:?}", lora.target_modules)),
            ("training data", examples_digest(train)),
            (
                "validation data",
                validation.map_or("none".into(), examples_digest),
            ),
        ];
        let mut identity = self.run_identity.clone();
        identity.extend(entries.map(|(k, v)| (k.to_string(), v)));
        // Absent for one process, so that earlier checkpoints still resume.
        if self.world_size > 1 {
            identity.insert(
                "data-parallel ranks (WORLD_SIZE, --nproc_per_node)".into(),
                self.world_size.to_string(),
            );
        }
        identity
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
    /// Time this process trained (a resumed run counts from its resumption).
    pub seconds: f64,
    /// Real tokens trained on.
    pub tokens: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    /// The lowest validation loss (its adapter is `best_model/`); `None` without validation data.
    pub best: Option<Evaluation>,
}

/// Mean loss per predicted token over `examples` (no dropout), in batches of `batch_size`; a
/// batch with nothing to predict adds nothing.
pub fn validation_loss(
    model: &impl Trainable,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    ignore_pad_token_for_loss: bool,
) -> Result<f64> {
    let batches = ValidationBatches {
        batch_size,
        pad_id,
        ignore_pad_token_for_loss,
    };
    batches.loss(model, examples, &SingleProcess)
}

/// How validation data is batched.
struct ValidationBatches {
    batch_size: usize,
    pad_id: u32,
    ignore_pad_token_for_loss: bool,
}

impl ValidationBatches {
    /// [`validation_loss`] split among the ranks: rank `r` evaluates batches `r, r + W, ...`, and
    /// the loss-weighted sums and target counts are summed over the ranks.
    fn loss(
        &self,
        model: &impl Trainable,
        examples: &[Example],
        ranks: &dyn Collective,
    ) -> Result<f64> {
        let mut sums = [0.0, 0.0]; // loss x targets, targets
        let chunks = examples.chunks(self.batch_size.max(1));
        for chunk in chunks.skip(ranks.rank()).step_by(ranks.world_size()) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let batch = collate(&refs, self.pad_id, self.ignore_pad_token_for_loss);
            let batch_targets = loss_targets(&batch);
            if batch_targets == 0 {
                continue;
            }
            sums[0] += model.eval_loss(&batch)? * batch_targets as f64;
            sums[1] += batch_targets as f64;
        }
        ranks.sum(&mut sums)?;
        Ok(sums[0] / sums[1].max(1.0))
    }
}

/// The micro-batches of a step that `rank` of `world_size` computes: `rank`, `rank + W`, ...
/// (with their positions in the step).
pub fn rank_micro_batches(
    step: &[Vec<usize>],
    rank: usize,
    world_size: usize,
) -> impl Iterator<Item = (usize, &Vec<usize>)> {
    step.iter()
        .enumerate()
        .skip(rank)
        .step_by(world_size.max(1))
}

/// The values of a checkpoint's `adapter` in the order of `specs` (`dir` names the checkpoint
/// in messages).
fn adapter_values(adapter: &LoraAdapter, specs: &[ParamSpec], dir: &Path) -> Result<Vec<Vec<f32>>> {
    let mismatch = |what: String| {
        Error::format(
            dir.display(),
            format!("the checkpoint's adapter does not fit the model: {what}"),
        )
    };
    if 2 * adapter.modules.len() != specs.len() {
        return Err(mismatch(format!(
            "{} adapted modules, the model has {}",
            adapter.modules.len(),
            specs.len() / 2
        )));
    }
    let saved: BTreeMap<String, &Vec<f32>> = adapter
        .modules
        .iter()
        .flat_map(|(module, pair)| {
            [
                (format!("{module}.lora_A"), &pair.a),
                (format!("{module}.lora_B"), &pair.b),
            ]
        })
        .collect();
    specs
        .iter()
        .map(|spec| {
            let values = saved
                .get(&spec.name)
                .ok_or_else(|| mismatch(format!("no matrix `{}`", spec.name)))?;
            if values.len() != spec.elements() {
                return Err(mismatch(format!(
                    "`{}` has {} values, the model's {:?}",
                    spec.name,
                    values.len(),
                    spec.shape
                )));
            }
            Ok(values.to_vec())
        })
        .collect()
}

/// Where a run stands between optimizer steps: what a checkpoint saves besides the weights and
/// the optimizer.
struct RunState {
    step: usize,
    /// The 0-based epoch in progress and its optimizer steps done.
    epoch: usize,
    steps_in_epoch: usize,
    /// The shuffle generator at the start of `epoch` (it regenerates the epoch's order).
    epoch_shuffle_rng: ChaCha12Rng,
    dropout_rng: ChaCha12Rng,
    best: Option<Evaluation>,
    tokens: usize,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
    /// The step of the newest checkpoint on disk, for the message of a diverged run.
    last_checkpoint: Option<usize>,
}

impl RunState {
    fn fresh(seed: u64) -> RunState {
        RunState {
            step: 0,
            epoch: 0,
            steps_in_epoch: 0,
            epoch_shuffle_rng: ChaCha12Rng::seed_from_u64(seed),
            dropout_rng: ChaCha12Rng::seed_from_u64(seed.wrapping_add(1)),
            best: None,
            tokens: 0,
            first_loss: None,
            last_loss: None,
            last_checkpoint: None,
        }
    }

    fn resumed(checkpoint: &Checkpoint) -> Result<RunState> {
        let saved = &checkpoint.state;
        let file = checkpoint.state_file();
        Ok(RunState {
            step: saved.global_step,
            epoch: saved.epoch,
            steps_in_epoch: saved.steps_in_epoch,
            epoch_shuffle_rng: saved.epoch_shuffle_rng.restore(&file)?,
            dropout_rng: saved.dropout_rng.restore(&file)?,
            best: saved.best.map(|b| Evaluation {
                step: b.step,
                val_loss: b.val_loss.0,
            }),
            tokens: saved.tokens,
            first_loss: saved.first_loss.map(|x| x.0),
            last_loss: saved.last_loss.map(|x| x.0),
            last_checkpoint: Some(saved.global_step),
        })
    }

    fn saved(&self, optimizer_step: u64, run: &BTreeMap<String, String>) -> TrainerState {
        TrainerState {
            global_step: self.step,
            optimizer_step,
            epoch: self.epoch,
            steps_in_epoch: self.steps_in_epoch,
            epoch_shuffle_rng: RngState::of(&self.epoch_shuffle_rng),
            dropout_rng: RngState::of(&self.dropout_rng),
            best: self.best.map(|b| BestState {
                step: b.step,
                val_loss: ExactF64(b.val_loss),
            }),
            tokens: self.tokens,
            first_loss: self.first_loss.map(ExactF64),
            last_loss: self.last_loss.map(ExactF64),
            log_lines: self.step,
            run: run.clone(),
        }
    }
}

/// The error of step `step` (1-based) whose loss, gradient norm, updated weights or validation
/// loss are not finite: the step, the examples of its batch (0-based index and line in the
/// training file), and what was kept.
fn diverged(
    what: &str,
    step: usize,
    state: &RunState,
    batch: &[&Vec<usize>],
    train: &[Example],
) -> Error {
    const SHOWN: usize = 16;
    let indices: Vec<usize> = batch.iter().flat_map(|b| b.iter().copied()).collect();
    let list = |f: &dyn Fn(usize) -> usize| {
        let mut text: Vec<String> = indices
            .iter()
            .take(SHOWN)
            .map(|&i| f(i).to_string())
            .collect();
        if indices.len() > SHOWN {
            text.push(format!("and {} more", indices.len() - SHOWN));
        }
        text.join(", ")
    };
    let kept = match state.last_checkpoint {
        Some(step) => format!("the last checkpoint is {}/", checkpoint_name(step)),
        None => "no checkpoint was written".into(),
    };
    Error::Invalid(format!(
        "{what} at step {step} (epoch {}; its batch: training examples {}, lines {} of the \
         training file): training diverged, try a lower --lr. Nothing was saved from this step \
         (best_model/, if any, is from an earlier one); {kept}",
        state.epoch + 1,
        list(&|i| i),
        list(&|i| train[i].line),
    ))
}

/// Trains the LoRA matrices of `model` on `train`, validating on `validation` when given, and
/// writes the log and the adapters into `out_dir` (which must exist). With
/// [`TrainOptions::resume_from`], the run continues from that checkpoint, which must have been
/// written by a run with the same identity; the log keeps its lines up to the checkpoint.
/// `progress` is told of every step.
pub fn train(
    model: &mut impl Trainable,
    train: &[Example],
    validation: Option<&[Example]>,
    options: &TrainOptions,
    adapter_config: &AdapterConfig,
    out_dir: &Path,
    progress: &mut dyn FnMut(&StepRecord),
) -> Result<Summary> {
    let run = Run {
        train,
        validation,
        options,
        adapter_config,
        out_dir,
    };
    train_data_parallel(model, &run, &SingleProcess, progress)
}

/// What a run trains on, how, and where it writes.
pub struct Run<'a> {
    pub train: &'a [Example],
    pub validation: Option<&'a [Example]>,
    pub options: &'a TrainOptions,
    pub adapter_config: &'a AdapterConfig,
    /// Written by rank 0 only.
    pub out_dir: &'a Path,
}

/// [`train`] as one rank of a data-parallel run over `ranks` (see the module's documentation);
/// every rank gets the same [`Summary`] (counts over all ranks).
pub fn train_data_parallel(
    model: &mut impl Trainable,
    run: &Run<'_>,
    ranks: &dyn Collective,
    progress: &mut dyn FnMut(&StepRecord),
) -> Result<Summary> {
    let Run {
        train,
        validation,
        options,
        adapter_config,
        out_dir,
    } = *run;
    options.check()?;
    if ranks.world_size() != options.world_size {
        return Err(Error::Invalid(format!(
            "the training options are for {} ranks, the run has {}",
            options.world_size,
            ranks.world_size()
        )));
    }
    let (rank, world_size) = (ranks.rank(), ranks.world_size());
    let writes = rank == 0;
    if train.is_empty() {
        return Err(Error::Invalid("no training examples".into()));
    }
    let total_steps = options.total_steps(train.len());
    let schedule = options.lr_schedule(total_steps);
    let specs = model.parameters();
    let trainable_params = specs.iter().map(ParamSpec::elements).sum();
    let run = options.identity(adapter_config, train, validation);
    let log_path = out_dir.join(LOG_FILE);
    let validation_batches = ValidationBatches {
        batch_size: options.batch_size,
        pad_id: options.pad_id,
        ignore_pad_token_for_loss: options.ignore_pad_token_for_loss,
    };
    let (mut state, mut log) = match &options.resume_from {
        None => {
            let log = writes.then(|| TrainLog::create(&log_path)).transpose()?;
            (RunState::fresh(options.seed), log)
        }
        Some(dir) => {
            let checkpoint = Checkpoint::load(dir)?;
            checkpoint.check_run(&run)?;
            let saved = &checkpoint.state;
            if saved.global_step > total_steps
                || saved.steps_in_epoch > options.steps_per_epoch(train.len())
            {
                return Err(Error::format(
                    checkpoint.state_file(),
                    "the step or the position in the epoch is beyond the run",
                ));
            }
            let weights = adapter_values(&checkpoint.adapter, &specs, dir)?;
            model.restore(weights, checkpoint.optimizer(&specs)?)?;
            let log = if writes {
                recover_out_dir(out_dir)?;
                Some(TrainLog::resume(&log_path, checkpoint.state.log_lines)?)
            } else {
                None
            };
            (RunState::resumed(&checkpoint)?, log)
        }
    };
    let started = Instant::now();

    while state.step < total_steps {
        let mut shuffle_rng = state.epoch_shuffle_rng.clone();
        let batches = epoch_batches(train.len(), options.batch_size, &mut shuffle_rng);
        let groups: Vec<&[Vec<usize>]> = batches.chunks(options.micro_batches_per_step()).collect();
        while state.steps_in_epoch < groups.len() && state.step < total_steps {
            let group = groups[state.steps_in_epoch];
            let step_started = Instant::now();
            model.zero_grad()?;
            // Every rank draws every micro-batch's dropout seed, in the step's order, so that a
            // micro-batch gets the same masks whichever rank computes it.
            let dropout_seeds: Vec<u64> =
                group.iter().map(|_| state.dropout_rng.random()).collect();
            let (mut loss_sum, mut tokens) = (0.0, 0);
            let mut first_non_finite = None;
            for (j, indices) in rank_micro_batches(group, rank, world_size) {
                let examples: Vec<&Example> = indices.iter().map(|&i| &train[i]).collect();
                let batch = collate(&examples, options.pad_id, options.ignore_pad_token_for_loss);
                let mut dropout_rng = ChaCha12Rng::seed_from_u64(dropout_seeds[j]);
                let value = model.accumulate_gradients(&batch, group.len(), &mut dropout_rng)?;
                if !value.is_finite() && first_non_finite.is_none() {
                    first_non_finite = Some((value, indices));
                }
                loss_sum += value;
                tokens += real_tokens(&batch);
            }
            // A non-finite loss on any rank makes the sum non-finite on all: all stop together.
            let mut sums = [loss_sum, tokens as f64];
            ranks.sum(&mut sums)?;
            let [loss_sum, tokens] = sums;
            let tokens = tokens as usize;
            if !loss_sum.is_finite() {
                let (what, batch): (String, Vec<&Vec<usize>>) = match first_non_finite {
                    Some((value, indices)) => {
                        (format!("the training loss is {value}"), vec![indices])
                    }
                    None => (
                        format!("the training loss (summed over the ranks) is {loss_sum}"),
                        group.iter().collect(),
                    ),
                };
                return Err(diverged(&what, state.step + 1, &state, &batch, train));
            }
            let allreduce = if world_size > 1 {
                Some(model.all_reduce_gradients(ranks)?)
            } else {
                None
            };
            let whole_group: Vec<&Vec<usize>> = group.iter().collect();
            let grad_norm = model.clip_grad_norm(options.max_grad_norm)?;
            if !grad_norm.is_finite() {
                let what = format!("the gradient norm is {grad_norm}");
                return Err(diverged(&what, state.step + 1, &state, &whole_group, train));
            }
            let lr = schedule.lr(state.step);
            model.optimizer_step(options.adamw, lr)?;
            if !model.weights_finite()? {
                let what = "the updated LoRA weights are not finite";
                return Err(diverged(what, state.step + 1, &state, &whole_group, train));
            }
            // Speed of the training step alone (over all ranks), validation and saving excluded.
            let tokens_per_s = tokens as f64 / step_started.elapsed().as_secs_f64();
            state.step += 1;
            state.steps_in_epoch += 1;
            state.tokens += tokens;
            let loss = loss_sum / group.len() as f64;
            state.first_loss.get_or_insert(loss);
            state.last_loss = Some(loss);
            let step = state.step;

            let eval_due =
                step == total_steps || options.eval_steps.is_some_and(|n| step.is_multiple_of(n));
            let val_loss = match validation.filter(|_| eval_due) {
                Some(examples) => {
                    let v = validation_batches.loss(model, examples, ranks)?;
                    if !v.is_finite() {
                        let what = format!("the validation loss after the update is {v}");
                        return Err(diverged(&what, step, &state, &whole_group, train));
                    }
                    if state.best.is_none_or(|b| v < b.val_loss) {
                        state.best = Some(Evaluation { step, val_loss: v });
                        if writes {
                            let best = model.adapter(adapter_config)?;
                            save_adapter(&best, &out_dir.join(BEST_DIR))?;
                        }
                    }
                    Some(v)
                }
                None => None,
            };
            let micro_done = batches
                .len()
                .min(state.steps_in_epoch * options.micro_batches_per_step());
            let record = StepRecord {
                step,
                epoch: state.epoch as f64 + micro_done as f64 / batches.len() as f64,
                loss,
                lr,
                grad_norm,
                tokens_per_s,
                allreduce_ms: allreduce.map(|d| d.as_secs_f64() * 1e3),
                val_loss,
            };
            let save_due = options.save_steps.is_some_and(|n| step.is_multiple_of(n));
            if let Some(log) = log.as_mut() {
                log.write(&record)?;
            }
            if save_due {
                if let Some(log) = log.as_mut() {
                    // The checkpoint claims the log's lines up to this step.
                    log.sync()?;
                    let optimizer = model.optimizer_state()?;
                    save_checkpoint(
                        out_dir,
                        &model.adapter(adapter_config)?,
                        &specs,
                        &optimizer,
                        &state.saved(optimizer.steps(), &run),
                        options.save_total_limit,
                    )?;
                }
                state.last_checkpoint = Some(step);
            }
            progress(&record);
        }
        if state.steps_in_epoch >= groups.len() {
            state.epoch += 1;
            state.steps_in_epoch = 0;
            state.epoch_shuffle_rng = shuffle_rng;
        }
    }
    if writes {
        save_adapter(&model.adapter(adapter_config)?, &out_dir.join(FINAL_DIR))?;
    }
    let epochs = state.step as f64 / options.steps_per_epoch(train.len()) as f64;
    Ok(Summary {
        trainable_params,
        steps: state.step,
        epochs,
        seconds: started.elapsed().as_secs_f64(),
        tokens: state.tokens,
        first_loss: state.first_loss.unwrap_or(f64::NAN),
        last_loss: state.last_loss.unwrap_or(f64::NAN),
        best: state.best,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_core::arch::{LoraConfig, TargetModules};
    use qlora_core::peft::LoraPair;

    #[test]
    fn ranks_split_each_step_without_overlap_in_the_single_process_order() {
        use rand::rngs::StdRng;
        // 23 examples in micro-batches of 2 (12, the last of one example), 3 ranks x 2
        // micro-batches a step: 2 steps, the second of 6 micro-batches, then none left.
        let batches = super::super::batches::epoch_batches(23, 2, &mut StdRng::seed_from_u64(4));
        for step in batches.chunks(6) {
            let shares: Vec<Vec<(usize, &Vec<usize>)>> = (0..3)
                .map(|rank| rank_micro_batches(step, rank, 3).collect())
                .collect();
            let mut positions: Vec<usize> = shares.iter().flatten().map(|(j, _)| *j).collect();
            positions.sort_unstable();
            assert_eq!(positions, (0..step.len()).collect::<Vec<_>>());
            for (rank, share) in shares.iter().enumerate() {
                for (j, micro_batch) in share {
                    assert_eq!(j % 3, rank);
                    assert_eq!(*micro_batch, &step[*j]);
                }
            }
        }
        // A last step with fewer micro-batches than ranks leaves some ranks without one.
        let short = &batches[10..];
        assert_eq!(rank_micro_batches(short, 2, 3).count(), 0);
        assert_eq!(rank_micro_batches(short, 1, 3).count(), 1);
    }

    #[test]
    fn a_checkpoint_adapter_is_read_in_parameter_order_or_refused() {
        let pair = |a: Vec<f32>, b: Vec<f32>| LoraPair {
            r: 1,
            in_features: a.len(),
            out_features: b.len(),
            a,
            b,
        };
        let lora = LoraConfig {
            r: 1,
            alpha: 2.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::AllLinear,
        };
        let adapter = LoraAdapter {
            config: AdapterConfig::new(lora, None),
            // Stored by name: "m.k" before "m.q".
            modules: BTreeMap::from([
                ("m.q".to_string(), pair(vec![1.0, 2.0], vec![3.0])),
                ("m.k".to_string(), pair(vec![4.0], vec![5.0, 6.0])),
            ]),
            dtype: qlora_core::DType::F32,
        };
        let specs: Vec<ParamSpec> = [
            ParamSpec::lora_pair("m.q", 1, 2, 1),
            ParamSpec::lora_pair("m.k", 1, 1, 2),
        ]
        .concat();
        let dir = Path::new("out/checkpoint-2");
        let values = adapter_values(&adapter, &specs, dir).unwrap();
        assert_eq!(
            values,
            [vec![1.0, 2.0], vec![3.0], vec![4.0], vec![5.0, 6.0]]
        );

        let err = |specs: &[ParamSpec]| {
            adapter_values(&adapter, specs, dir)
                .unwrap_err()
                .to_string()
        };
        let other_shape = [
            ParamSpec::lora_pair("m.q", 1, 3, 1),
            ParamSpec::lora_pair("m.k", 1, 1, 2),
        ]
        .concat();
        let e = err(&other_shape);
        assert!(
            e.contains("out/checkpoint-2")
                && e.contains("`m.q.lora_A` has 2 values, the model's [1, 3]"),
            "{e}"
        );
        let e = err(&specs[..2]);
        assert!(e.contains("2 adapted modules, the model has 1"), "{e}");
        let renamed = [
            ParamSpec::lora_pair("m.q", 1, 2, 1),
            ParamSpec::lora_pair("m.v", 1, 1, 2),
        ]
        .concat();
        assert!(err(&renamed).contains("no matrix `m.v.lora_A`"));
    }
}
