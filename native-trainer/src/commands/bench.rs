//! `qlora bench train`: CUDA training throughput and peak memory on BLOOM-7b1 shapes with random
//! weights, as JSON (see `qlora_trainer::cuda::bench`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use qlora_trainer::cuda::bench::{self, BenchConfig};
use qlora_trainer::cuda::Gpu;

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
    let What::Train(args) = args.what;
    let configs = args
        .configs
        .split(',')
        .map(parse_config)
        .collect::<Result<Vec<_>>>()?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let gpu = Gpu::open(0)?;
    eprintln!("device: {}", gpu.describe());
    let results = bench::run(
        &gpu,
        args.layers,
        &configs,
        args.steps,
        args.bf16_tflops * 1e12,
        &mut |r| {
            eprintln!(
                "{}: {:.0} tok/s, peak {:.2} GiB, {:.1}% of the floor",
                r.config,
                r.tok_s,
                r.peak_alloc_gib,
                100.0 * r.fraction_of_floor
            )
        },
    )?;
    let json = serde_json::json!({
        "device": gpu.describe(),
        "layers": args.layers,
        "bf16_tflops": args.bf16_tflops,
        "train": results,
    });
    let text = serde_json::to_string_pretty(&json)?;
    println!("{text}");
    if let Some(path) = &args.out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
