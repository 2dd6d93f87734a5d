//! `qlora inspect`: how much error 4-bit quantization puts into a checkpoint's weights, for
//! NF4 and FP4 at several block sizes, with and without double quant. The statistics are
//! `qlora_core::inspect`'s; this command reads the tensors, prints a table, and writes
//! `stats.json` (an `InspectReport`) and SVG plots.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qlora_core::arch::{ModelConfig, TensorRole};
use qlora_core::checkpoint::{open_checkpoint, TensorSource};
use qlora_core::fsutil::AtomicDir;
use qlora_core::inspect::{
    self, ErrorSummary, InspectReport, ModelReport, QuantConfig, TensorReport, TensorSummary,
};
use qlora_core::quant::{FloatData, QuantType};

use crate::plot::{self, HistogramChart, Markers, Series};
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
            let plots = tensor_plots(&report);
            (InspectReport::Tensor(report), plots)
        }
        None => {
            let report = inspect_model(source.as_ref(), dir, configs)?;
            print_header();
            for t in &report.tensors {
                print_table(&t.name, t.configs.iter());
            }
            print_totals(&report);
            let plots = heat_map_plots(&report);
            (InspectReport::Model(report), plots)
        }
    };
    if let Some(out) = out {
        let json = serde_json::to_string_pretty(&report)? + "\n";
        write(&out.join("stats.json"), &json)?;
        for (file, svg) in &plots {
            write(&out.join(file), svg)?;
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

/// Reads `name` as float values, with errors that name the checkpoint and the tensor.
fn read_floats<R>(
    source: &dyn TensorSource,
    dir: &Path,
    name: &str,
    use_values: impl FnOnce(FloatData<'_>, &[usize]) -> qlora_core::Result<R>,
) -> Result<R> {
    let location = || {
        let file = source
            .file_of(name)
            .unwrap_or_else(|| dir.display().to_string());
        format!("{file}: tensor `{name}`")
    };
    let tensor = source.read(name)?;
    let data = FloatData::from_le_bytes(tensor.dtype, &tensor.data).with_context(location)?;
    use_values(data, &tensor.shape).with_context(location)
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
    let report = read_floats(source, dir, name, |data, shape| {
        inspect::inspect_tensor(name, data.as_slice(), shape, configs, bins)
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
    if config.quantization.is_some() {
        bail!(
            "{}: already a quantized checkpoint (it has a quantization_config); inspect the \
             full-precision one",
            config_path.display()
        );
    }
    let present: BTreeSet<String> = source.tensor_infos().into_iter().map(|i| i.name).collect();
    let specs: Vec<_> = config
        .describe()
        .tensors()
        .into_iter()
        .filter(|s| s.role == TensorRole::LinearWeight)
        .collect();
    if let Some(missing) = specs.iter().find(|s| !present.contains(&s.name)) {
        bail!(
            "{}: tensor `{}` that {} calls for is missing",
            dir.display(),
            missing.name,
            config_path.display()
        );
    }
    let total = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum();
    let bar = progress::params_bar(total, "inspecting");
    let mut tensors: Vec<TensorSummary> = Vec::with_capacity(specs.len());
    for spec in &specs {
        bar.set_message(spec.name.clone());
        let summary = read_floats(source, dir, &spec.name, |data, shape| {
            inspect::summarize_tensor(&spec.name, data.as_slice(), shape, &configs)
        })?;
        tensors.push(summary);
        bar.inc(spec.shape.iter().product::<usize>() as u64);
    }
    bar.finish_and_clear();
    Ok(ModelReport::new(configs, tensors))
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

/// The configurations grouped by (block size, double quant), in order; NF4 and FP4 of a group
/// share a plot.
fn groups<T>(items: &[T], config: impl Fn(&T) -> QuantConfig) -> Vec<(String, Vec<&T>)> {
    let mut groups: Vec<((usize, bool), Vec<&T>)> = Vec::new();
    for item in items {
        let c = config(item);
        match groups
            .iter_mut()
            .find(|(k, _)| *k == (c.blocksize, c.double_quant))
        {
            Some((_, members)) => members.push(item),
            None => groups.push(((c.blocksize, c.double_quant), vec![item])),
        }
    }
    groups
        .into_iter()
        .map(|((bs, dq), members)| (format!("bs{bs}{}", if dq { "_dq" } else { "" }), members))
        .collect()
}

fn type_color(q: QuantType) -> &'static str {
    match q {
        QuantType::Nf4 => plot::PALETTE[0],
        QuantType::Fp4 => plot::PALETTE[1],
    }
}

fn group_title(c: QuantConfig) -> String {
    format!(
        "block size {}{}",
        c.blocksize,
        if c.double_quant { ", double quant" } else { "" }
    )
}

/// Per (block size, double quant): the weight histogram with the code levels of each type,
/// and the error and per-block relative error histograms of each type overlaid.
fn tensor_plots(report: &TensorReport) -> Vec<(String, String)> {
    let mut plots = Vec::new();
    for (tag, members) in groups(&report.configs, |d| d.summary.config) {
        let title = group_title(members[0].summary.config);
        let series = |histogram: fn(&inspect::ConfigDetail) -> &inspect::Histogram| {
            members
                .iter()
                .map(|d| Series {
                    label: d.summary.config.quant_type.to_string().to_uppercase(),
                    color: type_color(d.summary.config.quant_type),
                    histogram: histogram(d),
                })
                .collect()
        };
        let weights = HistogramChart {
            title: format!("{}: weights and 4-bit levels ({title})", report.name),
            x_label: "weight".into(),
            series: vec![Series {
                label: "weights".into(),
                color: plot::PALETTE[2],
                histogram: &report.weight_histogram,
            }],
            markers: members
                .iter()
                .map(|d| Markers {
                    label: format!(
                        "{} levels × median absmax {:.3e}",
                        d.summary.config.quant_type.to_string().to_uppercase(),
                        d.code_scale
                    ),
                    color: type_color(d.summary.config.quant_type),
                    xs: d.code_levels.clone(),
                })
                .collect(),
        };
        let error = HistogramChart {
            title: format!("{}: quantization error ({title})", report.name),
            x_label: "w − dequant(quant(w))".into(),
            series: series(|d| &d.error_histogram),
            markers: Vec::new(),
        };
        let block = HistogramChart {
            title: format!("{}: per-block relative error ({title})", report.name),
            x_label: "‖w − ŵ‖₂ / ‖w‖₂ of a block".into(),
            series: series(|d| &d.block_rel_error_histogram),
            markers: Vec::new(),
        };
        plots.push((format!("weights_{tag}.svg"), plot::histogram_svg(&weights)));
        plots.push((format!("error_{tag}.svg"), plot::histogram_svg(&error)));
        plots.push((
            format!("block_rel_error_{tag}.svg"),
            plot::histogram_svg(&block),
        ));
    }
    plots
}

/// Per (block size, double quant): the SQNR heat maps of NF4 and FP4 side by side.
fn heat_map_plots(report: &ModelReport) -> Vec<(String, String)> {
    groups(&report.heat_maps, |m| m.config)
        .into_iter()
        .map(|(tag, maps)| {
            let names: Vec<String> = maps
                .iter()
                .map(|m| m.config.quant_type.to_string().to_uppercase())
                .collect();
            let panels: Vec<(&str, &inspect::HeatMap)> = names
                .iter()
                .map(String::as_str)
                .zip(maps.iter().copied())
                .collect();
            let title = format!(
                "SQNR (dB) by layer and module, {}",
                group_title(maps[0].config)
            );
            (
                format!("sqnr_{tag}.svg"),
                plot::heat_maps_svg(&title, &panels),
            )
        })
        .collect()
}
