//! `qlora inspect`: how much error 4-bit quantization puts into a checkpoint's weights, for
//! NF4 and FP4 at several block sizes, with and without double quant. The statistics are
//! `qlora_core::inspect`'s; this command reads the tensors, prints a table, and writes
//! `stats.json` (an `InspectReport`) and the SVG charts of `inspect::{tensor,model}_figures`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qlora_core::arch::ModelConfig;
use qlora_core::checkpoint::{open_checkpoint, TensorSource};
use qlora_core::fsutil::AtomicDir;
use qlora_core::inspect::{
    self, ErrorSummary, Figure, InspectReport, ModelInspection, ModelReport, QuantConfig,
    TensorReport,
};

use qlora_trainer::progress;

#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct Args {
    /// Directory of the full-precision HF checkpoint.
    #[arg(long)]
    pub model_name_or_path: PathBuf,
    /// Inspect this one tensor in full (histograms and plots); without it, every weight that
    /// 4-bit loading quantizes is summarized and drawn as SQNR heat maps.
    #[arg(long)]
    pub tensor: Option<String>,
    /// Directory for stats.json and the SVG plots (written whole at the end, or not at all);
    /// without it only the table is printed.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace `--out` if it already holds files.
    #[arg(long)]
    pub overwrite: bool,
    /// Block sizes to compare, comma-separated (each 32, 64, ..., 4096).
    #[arg(long, value_delimiter = ',', default_values_t = inspect::DEFAULT_BLOCKSIZES, value_parser = super::quantize::parse_blocksize)]
    pub blocksizes: Vec<usize>,
    /// Bins of each histogram.
    #[arg(long, default_value_t = inspect::DEFAULT_BINS, value_parser = parse_bins)]
    pub bins: usize,
}

fn parse_bins(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n} bins: expected 1 to 10000")),
        Err(e) => Err(format!("`{s}`: {e}")),
    }
}

pub fn run(args: Args) -> Result<()> {
    let dir = &args.model_name_or_path;
    let mut seen = BTreeSet::new();
    let blocksizes: Vec<usize> = args
        .blocksizes
        .iter()
        .copied()
        .filter(|b| seen.insert(*b))
        .collect();
    let configs = inspect::quant_configs(&blocksizes);
    let source = open_checkpoint(dir)?;
    // Fail on a bad --out before any work is done.
    let out = match &args.out {
        Some(path) => Some(AtomicDir::create(path, args.overwrite)?),
        None => None,
    };
    let (report, plots) = match &args.tensor {
        Some(name) => {
            let report = inspect_one(source.as_ref(), dir, name, &configs, args.bins)?;
            print_header();
            print_table(
                report.name.as_str(),
                report.configs.iter().map(|d| &d.summary),
            );
            let plots = inspect::tensor_figures(&report);
            (InspectReport::Tensor(report), plots)
        }
        None => {
            let report = inspect_model(source.as_ref(), dir, configs)?;
            print_header();
            for t in &report.tensors {
                print_table(&t.name, t.configs.iter());
            }
            print_totals(&report);
            let plots = inspect::model_figures(&report);
            (InspectReport::Model(report), plots)
        }
    };
    if let Some(out) = out {
        let json = serde_json::to_string_pretty(&report)? + "\n";
        write(&out.join("stats.json"), &json)?;
        for Figure { file_name, svg, .. } in &plots {
            write(&out.join(file_name), svg)?;
        }
        let target = out.commit()?;
        eprintln!(
            "wrote {}: stats.json and {} plots",
            target.display(),
            plots.len()
        );
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn inspect_one(
    source: &dyn TensorSource,
    dir: &Path,
    name: &str,
    configs: &[QuantConfig],
    bins: usize,
) -> Result<TensorReport> {
    let infos = source.tensor_infos();
    let Some(info) = infos.iter().find(|i| i.name == name) else {
        let similar: Vec<&str> = infos
            .iter()
            .map(|i| i.name.as_str())
            .filter(|n| n.contains(name) || name.contains(n.rsplit('.').nth(1).unwrap_or(n)))
            .take(8)
            .collect();
        bail!(
            "{}: no tensor `{name}` in the checkpoint ({} tensors){}",
            dir.display(),
            infos.len(),
            if similar.is_empty() {
                String::new()
            } else {
                format!("; similar names: {}", similar.join(", "))
            }
        );
    };
    let bar = progress::params_bar(info.numel() as u64, "inspecting");
    bar.set_message(name.to_string());
    let report = inspect::with_weights(source, &dir.display().to_string(), name, |data, shape| {
        inspect::inspect_tensor(name, data, shape, configs, bins)
    })?;
    bar.finish_and_clear();
    Ok(report)
}

/// Every weight transformers quantizes when it loads the model in 4 bits, in model order.
fn inspect_model(
    source: &dyn TensorSource,
    dir: &Path,
    configs: Vec<QuantConfig>,
) -> Result<ModelReport> {
    let config_path = dir.join("config.json");
    let config = ModelConfig::load(&config_path)?;
    let mut inspection = ModelInspection::new(
        &config,
        &config_path.display().to_string(),
        source,
        &dir.display().to_string(),
        configs,
    )?;
    let total = inspection
        .specs()
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum();
    let bar = progress::params_bar(total, "inspecting");
    while let Some(spec) = inspection.next_tensor() {
        bar.set_message(spec.name.clone());
        let numel = spec.shape.iter().product::<usize>() as u64;
        inspection.step_tensor(source)?;
        bar.inc(numel);
    }
    bar.finish_and_clear();
    Ok(inspection.finish(source)?)
}

pub(crate) fn print_header() {
    println!(
        "{:<48} {:<12} {:>12} {:>12} {:>9}",
        "tensor", "config", "MSE", "max|err|", "SQNR dB"
    );
}

pub(crate) fn print_table<'a>(tensor: &str, summaries: impl Iterator<Item = &'a ErrorSummary>) {
    for s in summaries {
        println!(
            "{tensor:<48} {:<12} {:>12.4e} {:>12.4e} {:>9}",
            s.config.label(),
            s.mse,
            s.max_abs_error,
            sqnr_text(s.sqnr)
        );
    }
}

pub(crate) fn print_totals(report: &ModelReport) {
    for t in &report.totals {
        println!(
            "{:<48} {:<12} {:>12.4e} {:>12} {:>9}",
            "all linear weights",
            t.config.label(),
            t.mse,
            "",
            sqnr_text(t.sqnr)
        );
    }
}

fn sqnr_text(sqnr: inspect::Sqnr) -> String {
    match sqnr {
        inspect::Sqnr::Db(db) => format!("{db:.2}"),
        inspect::Sqnr::Lossless => "inf".into(),
        inspect::Sqnr::NoSignal => "n/a".into(),
    }
}
