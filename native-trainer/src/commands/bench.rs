//! `qlora bench train` and `qlora bench generate`: CUDA training throughput and peak memory, and
//! 4-bit generation speed, on BLOOM-7b1 shapes with random weights, as JSON (see
//! `qlora_trainer::cuda::bench` and `qlora_trainer::cuda::decode_bench`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use qlora_kernels::GemvKernel;
use qlora_trainer::cuda::bench::{self, BenchConfig};
use qlora_trainer::cuda::decode_bench::{self, BenchAdapter, GenerateBenchOptions};
use qlora_trainer::cuda::Gpu;
use qlora_trainer::distributed::launcher::{launch_this_program, rank_arguments};
use qlora_trainer::distributed::{NcclGroup, RankEnv};
use qlora_trainer::train::{Collective, SingleProcess};

#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand)]
pub enum What {
    /// QLoRA training steps (nf4 + double quant, LoRA r=16 on query_key_value, bf16).
    Train(TrainArgs),
    /// 4-bit generation (nf4 + double quant, bf16): batch-1 decoding, prefill, and an
    /// evaluation-shaped run.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct GenerateArgs {
    /// Transformer blocks (BLOOM-7b1 has 30).
    #[arg(long, default_value_t = 30)]
    pub layers: usize,
    /// Prompt tokens of the timed prefill.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    /// A JSON array of prompt lengths for the evaluation-shaped run (e.g. ADGEN's dev set:
    /// bench/generate/adgen_dev_prompt_lengths.json); without it that run is skipped.
    #[arg(long)]
    pub eval_prompt_lengths: Option<PathBuf>,
    /// Prompts generated together in the evaluation-shaped run.
    #[arg(long, default_value_t = 16)]
    pub eval_batch: usize,
    /// New tokens per prompt in the evaluation-shaped run (random weights never stop early).
    #[arg(long, default_value_t = 128)]
    pub eval_new_tokens: usize,
    /// Also measure with a LoRA adapter (r=16 on query_key_value), applied unmerged and merged
    /// into a bf16 copy of the weight (`predict`'s default and its `--merge_adapter`).
    #[arg(long)]
    pub lora: bool,
    /// The decoding GEMV measured throughout (the other one's step is timed beside it).
    #[arg(long, value_enum, default_value_t = Gemv::Tensor)]
    pub gemv: Gemv,
    /// Also write the JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The fused 4-bit GEMVs of decoding (see `qlora_kernels::GemvKernel`).
#[derive(Clone, Copy, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Gemv {
    OneChunk,
    Wide,
    Tensor,
}

#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct TrainArgs {
    /// Transformer blocks (BLOOM-7b1 has 30).
    #[arg(long, default_value_t = 30)]
    pub layers: usize,
    /// Comma-separated `<batch>x<seq>:<gc|nogc>` (gc: gradient checkpointing).
    #[arg(long, default_value = "4x128:gc,4x128:nogc,1x512:gc,16x128:gc")]
    pub configs: String,
    /// Timed steps per configuration (after two warm-up steps); the median is reported.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// The card's bf16 rate in TFLOP/s, for the floor (796: H100 SXM's measured dense rate).
    #[arg(long, default_value_t = 796.0)]
    pub bf16_tflops: f64,
    /// Also write the JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Data-parallel on this many GPUs of this host (one process each, NCCL all-reduce of the
    /// LoRA gradients): the batch of --configs is per GPU, tokens/s count all GPUs. Or start the
    /// processes yourself with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Data-parallel: seconds to wait for the other ranks before giving up.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub dist_timeout: u64,
}

fn parse_config(text: &str) -> Result<BenchConfig> {
    let parse = || -> Option<BenchConfig> {
        let (shape, mode) = text.trim().split_once(':')?;
        let (batch, seq) = shape.split_once('x')?;
        Some(BenchConfig {
            batch: batch.parse().ok()?,
            seq: seq.parse().ok()?,
            gradient_checkpointing: match mode {
                "gc" => true,
                "nogc" => false,
                _ => return None,
            },
        })
    };
    match parse() {
        Some(c) if c.batch > 0 && c.seq > 1 => Ok(c),
        _ => bail!("--configs: `{text}` is not <batch>x<seq>:<gc|nogc> (e.g. 4x128:gc)"),
    }
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Train(args) => train(args),
        What::Generate(args) => generate(args),
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let eval_prompt_lengths: Vec<usize> = match &args.eval_prompt_lengths {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not a JSON array of lengths", path.display()))?
        }
        None => Vec::new(),
    };
    let gpu = Gpu::open(0)?;
    eprintln!("device: {}", gpu.describe());
    let mut results = Vec::new();
    let adapters: &[BenchAdapter] = if args.lora {
        &[
            BenchAdapter::None,
            BenchAdapter::Unmerged,
            BenchAdapter::Merged,
        ]
    } else {
        &[BenchAdapter::None]
    };
    for &adapter in adapters {
        let label = adapter.describe();
        let options = GenerateBenchOptions {
            layers: args.layers,
            prefill_tokens: args.prefill_tokens,
            eval_prompt_lengths: eval_prompt_lengths.clone(),
            eval_batch: args.eval_batch,
            eval_new_tokens: args.eval_new_tokens,
            adapter,
            gemv: match args.gemv {
                Gemv::OneChunk => GemvKernel::OneChunk,
                Gemv::Wide => GemvKernel::Wide,
                Gemv::Tensor => GemvKernel::Tensor,
            },
        };
        let r = decode_bench::run(&gpu, &options, &mut |m| eprintln!("{label}: {m}"))?;
        eprintln!(
            "{label}: decode {:.0} tok/s (step {:.2} ms, {:.0}% of the {:.0} tok/s floor), prefill {:.0} tok/s, eval {:.2} examples/s",
            r.decode_tok_s_bs1,
            r.decode_step_ms,
            100.0 * r.fraction_of_floor,
            r.floor_tok_s,
            r.prefill_tok_s,
            r.eval_examples_s
        );
        results.push(r);
    }
    write_json(
        serde_json::json!({
            "device": gpu.describe(),
            "layers": args.layers,
            "generate": results,
        }),
        args.out.as_deref(),
    )
}

/// Prints `json` and, when given, writes it to `out`.
fn write_json(json: serde_json::Value, out: Option<&std::path::Path>) -> Result<()> {
    let text = serde_json::to_string_pretty(&json)?;
    println!("{text}");
    if let Some(path) = out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    let configs = args
        .configs
        .split(',')
        .map(parse_config)
        .collect::<Result<Vec<_>>>()?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if let Some(nproc) = args.nproc_per_node {
        return Ok(launch_this_program(nproc, "--nproc_per_node")?);
    }
    let rank_env = RankEnv::from_env()?.filter(|e| e.world_size > 1);
    let gpu = Gpu::open(rank_env.as_ref().map_or(0, |e| e.local_rank))?;
    let nccl;
    let ranks: &dyn Collective = match &rank_env {
        Some(env) => {
            let identity = rank_arguments("--nproc_per_node");
            nccl = NcclGroup::join(&gpu, env, &identity, Duration::from_secs(args.dist_timeout))?;
            &nccl
        }
        None => &SingleProcess,
    };
    let rank = ranks.rank();
    eprintln!("device: {}", gpu.describe());
    let results = bench::run(
        &gpu,
        ranks,
        args.layers,
        &configs,
        args.steps,
        args.bf16_tflops * 1e12,
        &mut |r| {
            if rank > 0 {
                return;
            }
            let allreduce = r
                .allreduce_ms_median
                .map_or(String::new(), |ms| format!(", all-reduce {ms:.2} ms/step"));
            eprintln!(
                "{} x {} GPU(s): {:.0} tok/s ({:.0} per GPU), peak {:.2} GiB, {:.1}% of the floor{allreduce}",
                r.config,
                r.world_size,
                r.tok_s,
                r.tok_s_per_gpu,
                r.peak_alloc_gib,
                100.0 * r.fraction_of_floor
            )
        },
    )?;
    if rank > 0 {
        return Ok(());
    }
    write_json(
        serde_json::json!({
            "device": gpu.describe(),
            "world_size": ranks.world_size(),
            "layers": args.layers,
            "bf16_tflops": args.bf16_tflops,
            "train": results,
        }),
        args.out.as_deref(),
    )
}
