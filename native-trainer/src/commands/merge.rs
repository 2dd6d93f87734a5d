//! `qlora merge`: folds a PEFT LoRA adapter into its base model (`W' = W + scale·B·A`) and writes
//! a full-precision checkpoint or a 4-bit one exactly as `qlora quantize` writes it, with a
//! report (`merge_report.json`, and a table on the terminal) of how much re-quantization moved
//! the merged weights and how the merged model's logits differ from base + adapter.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use qlora_core::checkpoint::TensorSource;
use qlora_core::fsutil::AtomicDir;
use qlora_core::inspect::{self, ModelReport, QuantConfig};
use qlora_core::peft::{self, LoraAdapter};
use qlora_core::quant::QuantType;
use qlora_core::tokenizer::Tokenizer;
use qlora_core::DType;

use qlora_trainer::cpu::Model;
use qlora_trainer::generate::model::load_model;
use qlora_trainer::load::{open_base, open_hf_weights};
use qlora_trainer::merge::report::{self, LogitsComparison, MergeReport};
use qlora_trainer::merge::MergedWeights;

use super::quantize::{copy_companion_files, parse_blocksize, write_checkpoint, FourBit};

/// Flags keep the seed project's snake_case spelling, as `qlora quantize` does.
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct Args {
    /// The base model: an HF directory (full precision, or 4-bit: dequantized first) or a
    /// LLaMA-family .gguf file.
    #[arg(long)]
    pub model_name_or_path: PathBuf,
    /// The PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (written whole at the end, or not at all).
    #[arg(long)]
    pub out: PathBuf,
    /// Re-quantize the merged linear weights to this 4-bit type, as `qlora quantize` does;
    /// without it the output is full precision.
    #[arg(long)]
    pub quan: Option<QuantType>,
    /// With --quan: quantize the per-block absmax too.
    #[arg(long, requires = "quan")]
    pub double_quant: bool,
    /// With --quan: weights per absmax block.
    #[arg(long, default_value_t = 64, value_parser = parse_blocksize, requires = "quan")]
    pub blocksize: usize,
    /// With --quan: the dtype 4-bit weights are dequantized to for compute.
    #[arg(long, default_value = "bf16", value_parser = parse_float_dtype, requires = "quan")]
    pub compute_dtype: DType,
    /// The dtype of the merged checkpoint's float tensors (with --quan: the dtype the weights
    /// are cast to before quantizing); by default each tensor keeps the base's.
    #[arg(long, value_parser = parse_float_dtype)]
    pub dtype: Option<DType>,
    /// A text file of prompts, one per line, to compare the logits on (default: three short
    /// built-in prompts).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Replace `--out` if it already holds files.
    #[arg(long)]
    pub overwrite: bool,
}

fn parse_float_dtype(s: &str) -> Result<DType, String> {
    DType::parse_float(s).ok_or_else(|| format!("`{s}` is not float32, bfloat16 or float16"))
}

pub fn run(args: Args) -> Result<()> {
    let base_path = &args.model_name_or_path;
    let base = open_base(base_path)?;
    if base.stored_4bit {
        tracing::warn!(
            "{} is a 4-bit checkpoint: the adapter is merged into its dequantized weights, so the \
             merged model keeps the base's quantization error{}",
            base_path.display(),
            if args.quan.is_some() {
                ", and re-quantizing rounds the merged weights a second time"
            } else {
                " (the original full-precision weights are not recovered)"
            }
        );
    }
    let adapter = LoraAdapter::load(&args.adapter)?;
    let adapter_file = args.adapter.join(peft::WEIGHTS_FILE).display().to_string();
    let merged = MergedWeights::new(&base.config, &*base.weights, &adapter, &adapter_file)
        .with_context(|| {
            format!(
                "the adapter in {} does not fit {}",
                args.adapter.display(),
                base_path.display()
            )
        })?;
    let prompts = read_prompts(args.prompts.as_deref())?;
    let prompt_ids = prompts
        .iter()
        .map(|p| report::prompt_ids(&base.tokenizer, p))
        .collect::<qlora_core::Result<Vec<_>>>()?;

    let out = AtomicDir::create(&args.out, args.overwrite)?;
    let four_bit = args.quan.map(|quant_type| FourBit {
        quant_type,
        blocksize: args.blocksize,
        double_quant: args.double_quant,
        compute_dtype: args.compute_dtype,
    });
    let quant_config = four_bit.map(|q| QuantConfig {
        quant_type: q.quant_type,
        blocksize: q.blocksize,
        double_quant: q.double_quant,
    });
    let config_path = if base_path.is_dir() {
        base_path.join("config.json")
    } else {
        base_path.clone()
    };
    let mut requantized = Vec::new();
    let written = write_checkpoint(
        &base.config,
        &merged,
        &config_path,
        four_bit,
        args.dtype,
        &out,
        |name, weights, shape| {
            if let Some(config) = quant_config {
                requantized.push(inspect::summarize_tensor(name, weights, shape, &[config])?);
            }
            Ok(())
        },
    )?;
    if base_path.is_dir() {
        copy_companion_files(base_path, &out)?;
    } else {
        write_tokenizer_files(&base.tokenizer, &out)?;
    }

    let logits = compare_logits(&base, &args.adapter, out.path(), &prompts, &prompt_ids)?;
    let merged_weights: Vec<String> = merged.merged_weights().map(String::from).collect();
    let output_format = match (four_bit, args.dtype) {
        (Some(q), _) => q.quant_type.as_str().to_string(),
        (None, Some(dtype)) => dtype.torch_name().to_string(),
        (None, None) => merged_dtype(&merged, &merged_weights),
    };
    let report = MergeReport {
        base: base_path.display().to_string(),
        adapter: args.adapter.display().to_string(),
        base_was_4bit: base.stored_4bit,
        scale: f64::from(merged.scale()),
        merged_weights,
        output_format,
        requantization: quant_config.map(|c| ModelReport::new(vec![c], requantized)),
        logits,
    };
    print_report(&report);
    let report_path = out.join("merge_report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", report_path.display()))?;
    let target = out.commit()?;
    eprintln!(
        "wrote {}: {} weights merged, {} as {}, {:.1} MiB of tensor data",
        target.display(),
        report.merged_weights.len(),
        if four_bit.is_some() {
            format!("{} weights quantized", written.quantized)
        } else {
            format!("{} tensors", written.kept)
        },
        report.output_format,
        written.bytes as f64 / (1 << 20) as f64,
    );
    Ok(())
}

/// The prompts of `file` (one per non-empty line), or the built-in ones.
fn read_prompts(file: Option<&Path>) -> Result<Vec<String>> {
    let Some(file) = file else {
        return Ok(report::DEFAULT_PROMPTS.map(String::from).to_vec());
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect();
    anyhow::ensure!(!prompts.is_empty(), "{}: no prompts", file.display());
    Ok(prompts)
}

/// The dtype the base stores its (first) merged weight in, which a full-precision output keeps.
fn merged_dtype(merged: &MergedWeights<'_>, names: &[String]) -> String {
    merged
        .tensor_infos()
        .into_iter()
        .find(|i| names.first() == Some(&i.name))
        .map_or_else(|| "float".into(), |i| i.dtype.torch_name().to_string())
}

/// Logits of base + adapter (the generation path, unmerged) against the checkpoint just written
/// to `out`, prompt by prompt; one model in memory at a time.
fn compare_logits(
    base: &qlora_trainer::load::OpenedBase,
    adapter: &Path,
    out: &Path,
    prompts: &[String],
    prompt_ids: &[Vec<u32>],
) -> Result<LogitsComparison> {
    let unmerged_model = load_model(&base.config, &*base.weights, Some(adapter))?;
    let vocab = unmerged_model.vocab_size();
    let unmerged = prompt_ids
        .iter()
        .map(|ids| report::logits(&unmerged_model, ids))
        .collect::<qlora_core::Result<Vec<_>>>()?;
    drop(unmerged_model);
    let (config, weights, _) = open_hf_weights(out)?;
    let merged_model = Model::load(&config, &*weights, None)
        .with_context(|| format!("loading the merged checkpoint in {}", out.display()))?;
    let mut compared = Vec::with_capacity(prompts.len());
    for ((prompt, ids), unmerged) in prompts.iter().zip(prompt_ids).zip(&unmerged) {
        let merged = report::logits(&merged_model, ids)?;
        compared.push(report::compare(prompt, vocab, unmerged, &merged));
    }
    Ok(LogitsComparison::new(compared))
}

/// A GGUF base's tokenizer as an HF directory holds it, so that the merged directory loads on
/// its own: `tokenizer.json`, and `tokenizer_config.json` with the special tokens, whether BOS
/// is added, and the chat template.
fn write_tokenizer_files(tokenizer: &Tokenizer, out: &AtomicDir) -> Result<()> {
    let path = out.join("tokenizer.json");
    std::fs::write(&path, tokenizer.to_tokenizer_json()?)
        .with_context(|| format!("writing {}", path.display()))?;
    let ids = tokenizer.special_ids();
    let mut config = serde_json::Map::new();
    config.insert("add_bos_token".into(), tokenizer.add_bos().into());
    for (key, id) in [
        ("bos_token", ids.bos),
        ("eos_token", ids.eos),
        ("pad_token", ids.pad),
        ("unk_token", ids.unk),
    ] {
        if let Some(token) = id.and_then(|id| tokenizer.id_to_token(id)) {
            config.insert(key.into(), token.into());
        }
    }
    if let Some(template) = tokenizer.chat_template() {
        config.insert("chat_template".into(), template.into());
    }
    let path = out.join("tokenizer_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

fn print_report(report: &MergeReport) {
    if let Some(requantization) = &report.requantization {
        println!("re-quantization of the merged weights (merged vs dequant(quant(merged))):");
        super::inspect::print_header();
        for t in &requantization.tensors {
            super::inspect::print_table(&t.name, t.configs.iter());
        }
        super::inspect::print_totals(requantization);
        println!();
    }
    println!("logits, base + adapter (unmerged) vs the merged model:");
    println!(
        "{:<40} {:>6} {:>12} {:>12} {:>7}",
        "prompt", "tokens", "max|diff|", "mean|diff|", "top-1"
    );
    let row = |label: &str, tokens: usize, max: f64, mean: f64, top1: f64| {
        println!(
            "{:<40} {tokens:>6} {max:>12.4e} {mean:>12.4e} {:>6.1}%",
            label.chars().take(40).collect::<String>(),
            top1 * 100.0
        )
    };
    for p in &report.logits.prompts {
        row(
            &p.prompt,
            p.tokens,
            p.max_abs_diff,
            p.mean_abs_diff,
            p.top1_agreement,
        );
    }
    let l = &report.logits;
    row(
        "all prompts",
        l.prompts.iter().map(|p| p.tokens).sum(),
        l.max_abs_diff,
        l.mean_abs_diff,
        l.top1_agreement,
    );
}
