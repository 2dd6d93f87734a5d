//! `qlora train`: QLoRA fine-tuning on a CUDA GPU or the CPU. A frozen (4-bit) base model, LoRA
//! adapters on its projections, AdamW on the adapters; the adapters come out as PEFT directories.
//!
//! Without any argument it runs the demo: SmolLM2-135M-Instruct (Q4_1 GGUF) on the built-in
//! ADGEN-style data, sized to finish in a few minutes on two CPU cores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::HumanCount;
use qlora_core::arch::{LoraConfig, TargetModules};
use qlora_core::data::{
    parse_jsonl, parse_jsonl_skipping_bad_lines, tokenize_records, Columns, ExampleOptions,
    Examples,
};
use qlora_core::peft::AdapterConfig;
use qlora_core::prompt::PromptTemplate;
use qlora_core::quant::QuantType;
use qlora_core::tokenizer::Tokenizer;
use qlora_trainer::cpu::{LoraInit, LoraSetup, Model};
use qlora_trainer::cuda::{CudaModel, CudaOptions, Gpu, Precision};
use qlora_trainer::distributed::launcher::{launch_this_program, rank_arguments};
use qlora_trainer::distributed::{NcclGroup, RankEnv};
use qlora_trainer::generate::model::{load_for_generation, GenerationDevice};
use qlora_trainer::generate::{evaluate, EvalOptions, Example};
use qlora_trainer::load::{load_base, QuantOnLoad};
use qlora_trainer::progress;
use qlora_trainer::train::checkpoint::{checkpoint_step, latest_checkpoint};
use qlora_trainer::train::log::StepRecord;
use qlora_trainer::train::optimizer::AdamWParams;
use qlora_trainer::train::schedule::ScheduleKind;
use qlora_trainer::train::trainer::{BEST_DIR, FINAL_DIR, LOG_FILE};
use qlora_trainer::train::{
    train_data_parallel, CpuTrainable, Run, SingleProcess, Summary, TrainOptions,
};

/// The demo data, built into the binary so that `qlora train` works from any directory.
const DEMO_TRAIN: DataFile = DataFile::Embedded {
    name: "data/demo/train.jsonl (built in)",
    text: include_str!("../../../data/demo/train.jsonl"),
};
const DEMO_VALIDATION: DataFile = DataFile::Embedded {
    name: "data/demo/dev.jsonl (built in)",
    text: include_str!("../../../data/demo/dev.jsonl"),
};

/// Flags keep the seed project's snake_case spelling. Options marked "demo:" take that value
/// when `qlora train` runs the demo (no `--model_name_or_path` and no `--train_file`).
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct Args {
    /// Base model: an HF directory (full precision or 4-bit) or a LLaMA-family `.gguf` file.
    /// Leave it and --train_file out to run the demo.
    #[arg(long)]
    pub model_name_or_path: Option<PathBuf>,
    /// JSON-lines training data.
    #[arg(long)]
    pub train_file: Option<PathBuf>,
    /// JSON-lines validation data: its loss is computed every --eval_steps and at the end, and
    /// the adapter with the lowest one is kept as `best_model/`.
    #[arg(long)]
    pub validation_file: Option<PathBuf>,
    #[arg(long, default_value = "content")]
    pub prompt_column: String,
    #[arg(long, default_value = "summary")]
    pub response_column: String,
    /// Column of earlier turns, a list of [query, response] pairs.
    #[arg(long)]
    pub history_column: Option<String>,
    /// Give padding no loss (`false`: padding is learned as the pad token).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true")]
    pub ignore_pad_token_for_loss: bool,
    /// Prompt tokens kept per example [default: 64; demo: 128].
    #[arg(long)]
    pub max_source_length: Option<usize>,
    /// Answer tokens kept per example, EOS included [default: 128].
    #[arg(long)]
    pub max_target_length: Option<usize>,
    /// Prompt format overriding the model's own (placeholders {system}, {history}, {query},
    /// {answer}).
    #[arg(long)]
    pub prompt_template: Option<String>,
    /// 4-bit type a full-precision base is quantized to on load (QLoRA's frozen base); `none`
    /// trains on the full-precision weights. A GGUF counts as full precision (its weights are
    /// dequantized first); a 4-bit HF checkpoint is used as it is.
    #[arg(long, value_enum, default_value = "nf4")]
    pub quan: BaseQuant,
    /// Quantize the per-block absmax too (QLoRA's double quantization).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true")]
    pub double_quant: bool,
    /// Weights per absmax block of the 4-bit base.
    #[arg(long, default_value_t = 64, value_parser = super::quantize::parse_blocksize)]
    pub blocksize: usize,
    /// LoRA rank [default: 16; demo: 8].
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha (scale = alpha / r) [default: 32; demo: 16].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Modules to adapt, comma-separated names or `all-linear` [default: the architecture's
    /// choice: query_key_value for BLOOM, every projection for LLaMA/Qwen2].
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Vec<String>,
    /// rsLoRA scaling: alpha / sqrt(r).
    #[arg(long)]
    pub use_rslora: bool,
    /// Passes over the training data [default: 1].
    #[arg(long)]
    pub epoch: Option<usize>,
    /// Optimizer steps to take, overriding --epoch [demo: 24].
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples per micro-batch [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches accumulated (averaged) into one optimizer step [default: 1].
    #[arg(long)]
    pub gradient_steps: Option<usize>,
    /// Peak learning rate [default: 2e-4; demo: 1e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, value_enum, default_value = "linear")]
    pub lr_scheduler: ScheduleKind,
    /// Steps of linear warmup from 0 [default: 0; demo: 2].
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping), as transformers' Trainer does.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Validate every this many steps (and at the end) [demo: 12].
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Write a checkpoint every this many steps: `checkpoint-<step>/` holds the adapter, the
    /// optimizer state, the data order and the RNG states, enough to resume exactly.
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep only the newest this many checkpoints.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Continue a killed or interrupted run from its newest checkpoint, with the same flags and
    /// data: no value takes --out_dir's; DIR is an output directory or one `checkpoint-<step>/`
    /// in it. Ends with the same adapter as an uninterrupted run.
    #[arg(long, alias = "resume", value_name = "DIR", num_args = 0..=1)]
    pub resume_from_checkpoint: Option<Option<PathBuf>>,
    /// Skip malformed lines of the data files (bad JSON, not UTF-8, missing columns) and report
    /// them, instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Seeds the adapters' initial values, the shuffle and the dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where to train [default: cuda when a CUDA device opens, else cpu].
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// Data-parallel training on this many GPUs of this host: starts one process per GPU (as
    /// torchrun does; or start them yourself with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    /// MASTER_PORT set). --batch_size is per GPU: a step averages --batch_size x GPUs x
    /// --gradient_steps examples.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Data-parallel: seconds to wait for the other ranks (rendezvous, NCCL set-up, each
    /// all-reduce) before giving up with an error.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub dist_timeout: u64,
    /// CUDA: keep only each layer's input and recompute the layer in the backward pass (less
    /// memory, about a third more compute).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// CUDA: activation precision (f32 is the exact check mode, slower and larger).
    #[arg(long, value_enum, default_value = "bf16")]
    pub precision: CudaPrecision,
    /// Output directory: train_log.jsonl, best_model/, final/ [default: output; demo: runs/demo].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Train into a non-empty --out_dir, replacing what the run writes there.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BaseQuant {
    Nf4,
    Fp4,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CudaPrecision {
    Bf16,
    F32,
}

impl From<CudaPrecision> for Precision {
    fn from(p: CudaPrecision) -> Precision {
        match p {
            CudaPrecision::Bf16 => Precision::Bf16,
            CudaPrecision::F32 => Precision::F32,
        }
    }
}

/// The CUDA device to work on, or `None` for the CPU: `--device cuda` must open one; without
/// `--device`, a device that does not open means the CPU (said in the log).
pub fn choose_device(device: Option<Device>) -> Result<Option<Gpu>> {
    choose_device_at(device, 0)
}

/// [`choose_device`] with the CUDA device `ordinal` (a data-parallel rank's LOCAL_RANK).
fn choose_device_at(device: Option<Device>, ordinal: usize) -> Result<Option<Gpu>> {
    match device {
        Some(Device::Cpu) => Ok(None),
        Some(Device::Cuda) => Ok(Some(Gpu::open(ordinal)?)),
        None => match Gpu::open(ordinal) {
            Ok(gpu) => Ok(Some(gpu)),
            Err(e) => {
                tracing::info!("using the CPU: {e}");
                Ok(None)
            }
        },
    }
}

/// The settings a run without the flag gets: the seed project's, or the demo's.
struct Defaults {
    max_source_length: usize,
    max_target_length: usize,
    lora_r: usize,
    lora_alpha: f64,
    epoch: usize,
    max_steps: Option<usize>,
    batch_size: usize,
    gradient_steps: usize,
    lr: f64,
    warmup_steps: usize,
    eval_steps: Option<usize>,
    out_dir: &'static str,
}

const SEED_DEFAULTS: Defaults = Defaults {
    max_source_length: 64,
    max_target_length: 128,
    lora_r: 16,
    lora_alpha: 32.0,
    epoch: 1,
    max_steps: None,
    batch_size: 4,
    gradient_steps: 1,
    lr: 2e-4,
    warmup_steps: 0,
    eval_steps: None,
    out_dir: "output",
};

/// Sized (on two CPU cores) to take about five minutes with a clearly falling loss.
const DEMO_DEFAULTS: Defaults = Defaults {
    // Above every demo example (all are under 128 tokens with SmolLM2's chat template).
    max_source_length: 128,
    max_target_length: 128,
    lora_r: 8,
    lora_alpha: 16.0,
    epoch: 1,
    max_steps: Some(24),
    batch_size: 4,
    gradient_steps: 1,
    lr: 1e-3,
    warmup_steps: 2,
    eval_steps: Some(12),
    out_dir: "runs/demo",
};

/// A JSON-lines data file on disk or built into the binary.
enum DataFile {
    Path(PathBuf),
    Embedded {
        name: &'static str,
        text: &'static str,
    },
}

impl DataFile {
    fn examples(
        &self,
        columns: &Columns,
        template: &PromptTemplate,
        tokenizer: &Tokenizer,
        options: &ExampleOptions,
        skip_bad_lines: bool,
    ) -> Result<Examples> {
        let (name, bytes) = match self {
            DataFile::Path(path) => (
                path.display().to_string(),
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            ),
            DataFile::Embedded { name, text } => (name.to_string(), text.as_bytes().to_vec()),
        };
        let records = if skip_bad_lines {
            let parsed = parse_jsonl_skipping_bad_lines(&name, &bytes, columns)?;
            if let Some(first) = parsed.bad_lines.first() {
                let lines: Vec<String> = parsed
                    .bad_lines
                    .iter()
                    .take(10)
                    .map(|b| b.line.to_string())
                    .collect();
                let more = if parsed.bad_lines.len() > 10 {
                    ", ..."
                } else {
                    ""
                };
                tracing::warn!(
                    "{name}: skipped {} bad lines (lines {}{more}); the first: {}",
                    parsed.bad_lines.len(),
                    lines.join(", "),
                    first.error
                );
            }
            parsed.records
        } else {
            parse_jsonl(&name, &bytes, columns).map_err(|e| match &e {
                // An error at one line (not of the whole file) can be skipped.
                qlora_core::Error::Format { file, .. } if *file != name => {
                    anyhow!("{e} (--skip_bad_lines skips such lines)")
                }
                _ => e.into(),
            })?
        };
        let examples = tokenize_records(&name, &records, template, tokenizer, options)?;
        tracing::info!(
            "{name}: {} examples ({} skipped as empty)",
            examples.examples.len(),
            examples.skipped_empty
        );
        if let Some(report) = examples.truncation_report(options) {
            tracing::warn!("{name}: {report}");
        }
        Ok(examples)
    }
}

pub fn run(args: Args) -> Result<()> {
    if let Some(nproc) = args.nproc_per_node {
        return Ok(launch_this_program(nproc, "--nproc_per_node")?);
    }
    let rank_env = RankEnv::from_env()?;
    let (rank, world_size) = rank_env.as_ref().map_or((0, 1), |e| (e.rank, e.world_size));
    let writes = rank == 0;
    if world_size > 1 && args.device == Some(Device::Cpu) {
        bail!(
            "WORLD_SIZE={world_size}: data-parallel training runs on CUDA GPUs (NCCL); drop \
             --device cpu or train in one process"
        );
    }
    let ordinal = rank_env.as_ref().map_or(0, |e| e.local_rank);
    let device = if world_size > 1 {
        Some(Device::Cuda)
    } else {
        args.device
    };
    let gpu = choose_device_at(device, ordinal)?;
    if let Some(gpu) = &gpu {
        match &rank_env {
            Some(env) if world_size > 1 => tracing::info!(
                "rank {} of {world_size}: training on GPU {ordinal}, {}",
                env.rank,
                gpu.describe()
            ),
            _ => tracing::info!("training on {}", gpu.describe()),
        }
    }
    let demo = args.model_name_or_path.is_none() && args.train_file.is_none();
    let (model_path, train_file, validation_file, defaults) = if demo {
        let path = qlora_core::demo::demo_gguf_path()
            .filter(|p| p.is_file())
            .context("the demo model is missing: run scripts/fetch-demo-model.sh first")?;
        tracing::info!(
            "no model or data given: running the demo on {}",
            path.display()
        );
        let validation = args.validation_file.clone().map(DataFile::Path);
        (
            path,
            DEMO_TRAIN,
            validation.or(Some(DEMO_VALIDATION)),
            DEMO_DEFAULTS,
        )
    } else {
        let (Some(model), Some(train)) = (&args.model_name_or_path, &args.train_file) else {
            bail!("give both --model_name_or_path and --train_file (or neither, for the demo)");
        };
        let validation = args.validation_file.clone().map(DataFile::Path);
        (
            model.clone(),
            DataFile::Path(train.clone()),
            validation,
            SEED_DEFAULTS,
        )
    };
    let (out_dir, resume_from) = match &args.resume_from_checkpoint {
        None => {
            let out_dir = args
                .out_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(defaults.out_dir));
            // The demo's own directory is rewritten by every demo run.
            let overwrite = args.overwrite || (demo && args.out_dir.is_none());
            if writes {
                check_out_dir(&out_dir, overwrite)?;
            }
            (out_dir, None)
        }
        Some(dir) => {
            let default_out_dir = Path::new(defaults.out_dir);
            let (out_dir, checkpoint) =
                resume_point(dir.as_deref(), args.out_dir.as_deref(), default_out_dir)?;
            tracing::info!("resuming from {}", checkpoint.display());
            (out_dir, Some(checkpoint))
        }
    };

    // A GGUF is dequantized and then treated like any full-precision checkpoint: --quan
    // quantizes its linear weights on load, as for an HF directory (a 4-bit HF checkpoint is
    // the one base used as stored).
    let quant = match args.quan {
        BaseQuant::Nf4 => Some(QuantType::Nf4),
        BaseQuant::Fp4 => Some(QuantType::Fp4),
        BaseQuant::None => None,
    }
    .map(|quant_type| QuantOnLoad {
        quant_type,
        double_quant: args.double_quant,
        blocksize: args.blocksize,
    });
    let base = load_base(&model_path, quant, args.prompt_template.as_deref())?;
    tracing::info!(
        "base: {} ({:?} weights)",
        model_path.display(),
        base.base_weights
    );

    let columns = Columns {
        prompt: args.prompt_column.clone(),
        response: args.response_column.clone(),
        history: args.history_column.clone(),
    };
    let example_options = ExampleOptions {
        max_source_length: args.max_source_length.unwrap_or(defaults.max_source_length),
        max_target_length: args.max_target_length.unwrap_or(defaults.max_target_length),
        system: None,
    };
    let examples = |file: &DataFile| {
        file.examples(
            &columns,
            &base.template,
            &base.tokenizer,
            &example_options,
            args.skip_bad_lines,
        )
    };
    let train_examples = examples(&train_file)?;
    let validation_examples = validation_file.as_ref().map(examples).transpose()?;

    let target_modules = match args.target_modules.as_slice() {
        [] => TargetModules::Names(
            base.config
                .architecture()
                .default_lora_targets()
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
        [all] if all == "all-linear" => TargetModules::AllLinear,
        names => TargetModules::Names(names.to_vec()),
    };
    let lora = LoraConfig {
        r: args.lora_r.unwrap_or(defaults.lora_r),
        alpha: args.lora_alpha.unwrap_or(defaults.lora_alpha),
        dropout: args.lora_dropout,
        use_rslora: args.use_rslora,
        target_modules,
    };
    let adapter_config = AdapterConfig::new(lora.clone(), Some(model_path.display().to_string()));
    let setup = LoraSetup {
        config: lora,
        init: LoraInit::Random { seed: args.seed },
    };

    let pad_id = base
        .tokenizer
        .pad_id()
        .or(base.tokenizer.eos_id())
        .context("the tokenizer has neither a pad nor an EOS token to pad batches with")?;
    let cuda_precision = Precision::from(args.precision);
    let mut run_identity = BTreeMap::from([
        (
            "--model_name_or_path".to_string(),
            model_path.display().to_string(),
        ),
        (
            "--quan, --double_quant, --blocksize".to_string(),
            quant.map_or("none".into(), |q| {
                format!("{:?}, {}, {}", q.quant_type, q.double_quant, q.blocksize)
            }),
        ),
    ]);
    // The CPU and the CUDA path (in either precision) round differently: a run resumed on
    // another one would not end as the uninterrupted run does. (Absent on the CPU, so that
    // checkpoints written before CUDA ones existed still resume.)
    if gpu.is_some() {
        run_identity.insert(
            "CUDA precision (--device cuda, --precision)".to_string(),
            format!("{cuda_precision:?}").to_lowercase(),
        );
    }
    let options = TrainOptions {
        epochs: args.epoch.unwrap_or(defaults.epoch),
        max_steps: args.max_steps.or(defaults.max_steps),
        batch_size: args.batch_size.unwrap_or(defaults.batch_size),
        gradient_steps: args.gradient_steps.unwrap_or(defaults.gradient_steps),
        world_size,
        schedule: args.lr_scheduler,
        lr: args.lr.unwrap_or(defaults.lr),
        warmup_steps: args.warmup_steps.unwrap_or(defaults.warmup_steps),
        adamw: AdamWParams::with_weight_decay(args.weight_decay),
        max_grad_norm: args.max_grad_norm,
        eval_steps: args.eval_steps.or(defaults.eval_steps),
        save_steps: args.save_steps,
        save_total_limit: args.save_total_limit,
        resume_from,
        run_identity,
        seed: args.seed,
        pad_id,
        ignore_pad_token_for_loss: args.ignore_pad_token_for_loss,
    };
    if options.resume_from.is_none() && writes {
        create_out_dir(&out_dir)?;
    }
    let total_steps = options.total_steps(train_examples.examples.len());
    // Rank 0 alone reports progress (and tokens/s over all GPUs).
    let bar = if writes {
        progress::steps_bar(total_steps as u64, "training")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report_every = total_steps.div_ceil(20).max(1);
    let mut on_step = |r: &StepRecord| {
        if !writes {
            return;
        }
        bar.set_position(r.step as u64);
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s",
            r.loss, r.lr, r.tokens_per_s
        ));
        if let Some(v) = r.val_loss {
            bar.suspend(|| tracing::info!("step {}: validation loss {v:.4}", r.step));
        } else if bar.is_hidden() && (r.step.is_multiple_of(report_every) || r.step == 1) {
            tracing::info!(
                "step {}/{total_steps}: loss {:.4}, lr {:.2e}, {:.0} tok/s",
                r.step,
                r.loss,
                r.lr,
                r.tokens_per_s
            );
        }
    };
    let run = Run {
        train: &train_examples.examples,
        validation: validation_examples.as_ref().map(|v| v.examples.as_slice()),
        options: &options,
        adapter_config: &adapter_config,
        out_dir: &out_dir,
    };
    let summary = match &gpu {
        Some(gpu) => {
            let cuda_options = CudaOptions {
                precision: cuda_precision,
                gradient_checkpointing: args.gradient_checkpointing,
            };
            let mut model = CudaModel::load(
                gpu,
                &base.config,
                &*base.weights,
                Some(&setup),
                cuda_options,
            )?;
            match rank_env.as_ref().filter(|_| world_size > 1) {
                // Joined once the model is loaded: the slow, failure-prone part is behind.
                Some(env) => {
                    let identity = rank_arguments("--nproc_per_node");
                    let timeout = Duration::from_secs(args.dist_timeout);
                    let ranks = NcclGroup::join(gpu, env, &identity, timeout)?;
                    tracing::info!("rank {rank}: joined the {world_size} ranks");
                    train_data_parallel(&mut model, &run, &ranks, &mut on_step)
                }
                None => train_data_parallel(&mut model, &run, &SingleProcess, &mut on_step),
            }
        }
        None => {
            let model = Model::load(&base.config, &*base.weights, Some(&setup))?;
            let mut trainable = CpuTrainable::new(&model)?;
            train_data_parallel(&mut trainable, &run, &SingleProcess, &mut on_step)
        }
    };
    bar.finish_and_clear();
    let summary = summary?;
    if !writes {
        return Ok(());
    }
    print_summary(&summary, &out_dir);
    if demo {
        let adapter = if summary.best.is_some() {
            BEST_DIR
        } else {
            FINAL_DIR
        };
        let device = match &gpu {
            Some(gpu) => GenerationDevice::Cuda {
                gpu: gpu.clone(),
                precision: cuda_precision,
                merge_adapter: false,
            },
            None => GenerationDevice::Cpu,
        };
        after_demo_training(&model_path, &out_dir.join(adapter), &device)?;
    }
    Ok(())
}

/// Refuses a non-empty output directory without `overwrite`, so that a run never mixes its log
/// and adapters with another's by accident. Checked before anything is loaded; the directory is
/// made by [`create_out_dir`] once the model and the data are ready.
fn check_out_dir(dir: &Path, overwrite: bool) -> Result<()> {
    if dir.is_dir() && !overwrite && !out_dir_entries(dir)?.is_empty() {
        bail!(
            "{}: exists and is not empty (pass --overwrite to train into it anyway, or \
             --resume_from_checkpoint to continue the run there)",
            dir.display()
        );
    }
    Ok(())
}

fn out_dir_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("reading {}", dir.display()))
}

/// Creates the output directory, first removing the adapters and checkpoints an earlier run
/// wrote there (a run without validation data writes no `best_model/`, and an old one must not
/// pass for its result).
fn create_out_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        for entry in out_dir_entries(dir)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            // The adapters, and what a killed run left of them (`final.tmp-<pid>`, ...).
            let adapter = |base: &str| name == base || name.starts_with(&format!("{base}."));
            let ours = adapter(BEST_DIR) || adapter(FINAL_DIR) || name.starts_with("checkpoint-");
            if ours && entry.path().is_dir() {
                std::fs::remove_dir_all(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// The output directory and the checkpoint that `--resume_from_checkpoint [DIR]` continues:
/// `DIR` (or else `--out_dir`, or else the default output directory) is an output directory,
/// whose newest checkpoint is taken, or one `checkpoint-<step>/` of it.
fn resume_point(
    dir: Option<&Path>,
    out_dir: Option<&Path>,
    default_out_dir: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let dir = dir.or(out_dir).unwrap_or(default_out_dir);
    let named_checkpoint = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(checkpoint_step)
        .is_some();
    let (run_dir, checkpoint) = if named_checkpoint {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        let run_dir = parent.unwrap_or(Path::new(".")).to_path_buf();
        (run_dir, dir.to_path_buf())
    } else {
        if !dir.is_dir() {
            bail!("{}: no such directory to resume a run from", dir.display());
        }
        let checkpoint = latest_checkpoint(dir)?.with_context(|| {
            format!(
                "{}: no complete checkpoint to resume from (write some with --save_steps, or \
                 start the run again)",
                dir.display()
            )
        })?;
        (dir.to_path_buf(), checkpoint)
    };
    if let Some(out_dir) = out_dir.filter(|o| !same_dir(o, &run_dir)) {
        bail!(
            "--out_dir {} is not the directory of {} (give one of them, or the same directory to both)",
            out_dir.display(),
            checkpoint.display()
        );
    }
    Ok((run_dir, checkpoint))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn print_summary(summary: &Summary, out_dir: &Path) {
    println!(
        "trainable parameters: {}",
        HumanCount(summary.trainable_params as u64)
    );
    println!(
        "steps: {} ({:.2} epochs, {} tokens) in {:.1} s",
        summary.steps,
        summary.epochs,
        HumanCount(summary.tokens as u64),
        summary.seconds
    );
    println!(
        "training loss: {:.4} (first step) -> {:.4} (last step)",
        summary.first_loss, summary.last_loss
    );
    match summary.best {
        Some(best) => println!(
            "best validation loss: {:.4} at step {} -> {}",
            best.val_loss,
            best.step,
            out_dir.join(BEST_DIR).display()
        ),
        None => println!("no validation data: no best_model/"),
    }
    println!("final adapter: {}", out_dir.join(FINAL_DIR).display());
    println!("log: {}", out_dir.join(LOG_FILE).display());
}

/// Dev examples the demo generates for, before and after training: enough to show the change,
/// few enough to keep the demo within minutes on two CPU cores.
const DEMO_EVAL_EXAMPLES: usize = 8;
/// New tokens per demo answer: every demo answer is under 64 tokens.
const DEMO_EVAL_NEW_TOKENS: usize = 64;

/// The demo's step after training: greedy answers of the base model and of base + the trained
/// adapter on the first dev examples, their ADGEN metrics side by side, and one example.
fn after_demo_training(base: &Path, adapter_dir: &Path, device: &GenerationDevice) -> Result<()> {
    let DataFile::Embedded { name, text } = DEMO_VALIDATION else {
        unreachable!("the demo's validation data is built in")
    };
    let examples: Vec<Example> = parse_jsonl(name, text.as_bytes(), &Columns::default())?
        .into_iter()
        .take(DEMO_EVAL_EXAMPLES)
        .map(|r| Example {
            prompt: r.query,
            label: r.response,
        })
        .collect();
    let options = EvalOptions {
        max_new_tokens: DEMO_EVAL_NEW_TOKENS,
        ..EvalOptions::default()
    };
    let mut runs = Vec::new();
    for (label, adapter) in [("base", None), ("fine-tuned", Some(adapter_dir))] {
        let g = load_for_generation(base, adapter, None, None, device.clone())?;
        let bar = progress::steps_bar(examples.len() as u64, "generating");
        bar.set_message(label);
        let evaluation = evaluate(
            &*g.model,
            &g.tokenizer,
            &g.template,
            &examples,
            &options,
            |done, _| bar.set_position(done as u64),
        )?;
        bar.finish_and_clear();
        runs.push((label, evaluation));
    }
    println!("ADGEN metrics on {} dev examples (greedy):", examples.len());
    for (label, evaluation) in &runs {
        println!(
            "  {label:<10} {}",
            serde_json::to_string(&evaluation.scores)?
        );
    }
    println!("example: {}", examples[0].prompt);
    for (label, evaluation) in &runs {
        println!("  {label:<10} {}", evaluation.predictions[0].pred);
    }
    println!("  {:<10} {}", "reference", examples[0].label);
    println!(
        "adapter: {} (PEFT format: PeftModel.from_pretrained(base, \"{}\"))",
        adapter_dir.display(),
        adapter_dir.display()
    );
    Ok(())
}
