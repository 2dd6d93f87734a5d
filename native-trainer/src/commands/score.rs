//! `qlora score`: the ADGEN metrics (ROUGE-1/2/L, BLEU-4, as ChatGLM's evaluation computes them)
//! of a JSON-lines file of predictions, printed as one JSON object on stdout.

use std::path::{Path, PathBuf};

use anyhow::Context;
use qlora_core::metrics::{mean, AdgenScorer};

#[derive(clap::Args)]
pub struct Args {
    /// JSON lines, one `{"pred": ..., "label": ...}` object per line (ChatGLM's
    /// `generated_predictions.txt` keys `predict` and `labels` are accepted too); blank lines
    /// are skipped.
    #[arg(long)]
    pub predictions: PathBuf,
}

#[derive(serde::Deserialize)]
struct Pair {
    #[serde(alias = "predict")]
    pred: String,
    #[serde(alias = "labels")]
    label: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let pairs = read_pairs(&args.predictions)?;
    let scorer = AdgenScorer::new();
    let scores: Vec<_> = pairs
        .iter()
        .map(|pair| scorer.score_pair(&pair.pred, &pair.label))
        .collect();
    let mean = mean(&scores)
        .with_context(|| format!("{}: no prediction pairs", args.predictions.display()))?;
    println!("{}", serde_json::to_string(&mean)?);
    Ok(())
}

/// Every non-blank line as a pair; a line that is not one is an error naming `file:line`.
fn read_pairs(path: &Path) -> anyhow::Result<Vec<Pair>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| {
                format!(
                    "{}:{}: not a {{\"pred\": string, \"label\": string}} object",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}
