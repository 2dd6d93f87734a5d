//! `qlora`: the command-line tool. Each subcommand lives in its own module under `commands/`.

use clap::{Parser, Subcommand};

mod commands;

#[derive(Parser)]
#[command(
    name = "qlora",
    version,
    about = "QLoRA fine-tuning and 4-bit inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize a full-precision HF checkpoint to NF4/FP4, in the layout transformers writes.
    Quantize(commands::quantize::Args),
    /// ADGEN metrics (ROUGE-1/2/L, BLEU-4) of a JSON-lines file of predictions and labels.
    Score(commands::score::Args),
    /// Quantization error of NF4/FP4 on a checkpoint's weights: a table, stats.json, SVG plots.
    Inspect(commands::inspect::Args),
    /// QLoRA fine-tuning on the CPU (no arguments: the demo on SmolLM2-135M).
    Train(Box<commands::train::Args>),
    /// Fold a LoRA adapter into its base model: a full-precision or re-quantized 4-bit checkpoint.
    Merge(commands::merge::Args),
    /// Generate with a base model and an optional adapter: one prompt, a file, or a chat.
    Predict(commands::predict::Args),
    /// Generate for a validation file and report ROUGE-1/2/L and BLEU-4.
    Eval(commands::eval::Args),
    /// Measure: `qlora bench train` (CUDA training on BLOOM-7b1 shapes, random weights).
    Bench(commands::bench::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Quantize(args) => commands::quantize::run(args),
        Command::Score(args) => commands::score::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Train(args) => commands::train::run(*args),
        Command::Merge(args) => commands::merge::run(args),
        Command::Predict(args) => commands::predict::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Bench(args) => commands::bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
