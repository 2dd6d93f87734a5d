//! `qlora eval`: generates a response (greedy by default) for each example of a validation file
//! and prints the ADGEN metrics (ROUGE-1/2/L, BLEU-4) as one JSON object, with the same keys as
//! `qlora score`; `--output` keeps the `{"pred", "label"}` lines `qlora score` reads.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use qlora_trainer::generate::{evaluate, EvalOptions, Example, SamplingParams};

use super::predict::{ModelArgs, SamplingArgs};

#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Defaults: greedy, no repetition penalty.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// JSON lines, one example per line (ADGEN: `{"content": ..., "summary": ...}`).
    #[arg(long)]
    pub validation_file: PathBuf,
    #[arg(long, default_value = "content")]
    pub prompt_column: String,
    #[arg(long, default_value = "summary")]
    pub response_column: String,
    /// Evaluate only the first N examples.
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Prompts generated together (left-padded). 16: on the GPU the fused 4-bit GEMV serves up
    /// to 32 rows, and batches of 16 ran 20 examples/s on an H100 (bench/generate/README.md).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Where to write the predictions, one `{"pred", "label"}` JSON object per line.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut examples = read_examples(
        &args.validation_file,
        &args.prompt_column,
        &args.response_column,
    )?;
    if let Some(n) = args.max_samples {
        examples.truncate(n);
    }
    if examples.is_empty() {
        bail!("{}: no examples", args.validation_file.display());
    }
    let loaded = args.model.load()?;
    let options = EvalOptions {
        sampling: args.sampling.params(SamplingParams::GREEDY),
        seed: args.sampling.seed,
        max_new_tokens: args.sampling.max_new_tokens,
        batch_size: args.batch_size,
        system: args.model.system.clone(),
    };
    let evaluation = evaluate(
        &*loaded.model,
        &loaded.tokenizer,
        &loaded.template,
        &examples,
        &options,
        |done, total| tracing::info!("generated {done}/{total}"),
    )?;
    if let Some(output) = &args.output {
        let mut body = String::new();
        for p in &evaluation.predictions {
            body.push_str(&serde_json::to_string(p)?);
            body.push('\n');
        }
        std::fs::write(output, body).with_context(|| format!("{}", output.display()))?;
    }
    println!("{}", serde_json::to_string(&evaluation.scores)?);
    Ok(())
}

/// The examples of a JSON-lines file; a line without both string columns is an error naming
/// `file:line`.
fn read_examples(path: &Path, prompt: &str, response: &str) -> anyhow::Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let at = || format!("{}:{}", path.display(), i + 1);
            let object: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
            let field = |name: &str| {
                object
                    .get(name)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .with_context(|| format!("{}: no string field `{name}`", at()))
            };
            Ok(Example {
                prompt: field(prompt)?,
                label: field(response)?,
            })
        })
        .collect()
}
