//! `qlora quantize`: a full-precision HF checkpoint in, a 4-bit checkpoint out, in the layout
//! transformers + bitsandbytes write (`save_pretrained` of a model loaded with
//! `BitsAndBytesConfig(load_in_4bit=True, ...)`), tensor by tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qlora_core::arch::{ModelConfig, QuantizationConfig, TensorRole, TensorSpec};
use qlora_core::checkpoint::bnb4bit;
use qlora_core::checkpoint::spill::Spill;
use qlora_core::checkpoint::{open_checkpoint, RawTensor, TensorSource};
use qlora_core::fsutil::AtomicDir;
use qlora_core::quant::{self, FloatData, FloatSlice, QuantType};
use qlora_core::DType;

use qlora_trainer::progress;

/// Files of a model directory that are not weights and travel with it unchanged.
const COMPANION_FILES: [&str; 10] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Flags keep the seed project's snake_case spelling (`--model_name_or_path`, `--double_quant`).
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct Args {
    /// Directory of the full-precision HF checkpoint (safetensors or PyTorch .bin, single or
    /// sharded).
    #[arg(long)]
    pub model_name_or_path: PathBuf,
    /// The 4-bit data type.
    #[arg(long, default_value = "nf4")]
    pub quan: QuantType,
    /// Quantize the per-block absmax too (8-bit, blocks of 256): about 0.37 bits per weight less.
    #[arg(long)]
    pub double_quant: bool,
    /// Weights per absmax block: 32, 64, ..., 4096.
    #[arg(long, default_value_t = 64, value_parser = parse_blocksize)]
    pub blocksize: usize,
    /// The dtype 4-bit weights are dequantized to for compute (`bnb_4bit_compute_dtype`).
    #[arg(long, default_value = "bf16", value_parser = parse_float_dtype)]
    pub compute_dtype: DType,
    /// The dtype to cast the weights to before quantizing, and to store the unquantized tensors
    /// in (transformers' `dtype=`); by default each tensor keeps its own.
    #[arg(long, value_parser = parse_float_dtype)]
    pub dtype: Option<DType>,
    /// Output directory (written whole at the end, or not at all).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` if it already holds files.
    #[arg(long)]
    pub overwrite: bool,
}

pub(crate) fn parse_blocksize(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("`{s}`: {e}"))?;
    if quant::BLOCKSIZES.contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "blocksize {n} is not one of {:?}",
            quant::BLOCKSIZES
        ))
    }
}

fn parse_float_dtype(s: &str) -> Result<DType, String> {
    DType::parse_float(s).ok_or_else(|| format!("`{s}` is not float32, bfloat16 or float16"))
}

pub fn run(args: Args) -> Result<()> {
    let dir = &args.model_name_or_path;
    let config_path = dir.join("config.json");
    let config = ModelConfig::load(&config_path)?;
    if config.quantization.is_some() {
        bail!(
            "{}: already a quantized checkpoint (it has a quantization_config)",
            config_path.display()
        );
    }
    let source = open_checkpoint(dir)?;
    let four_bit = FourBit {
        quant_type: args.quan,
        blocksize: args.blocksize,
        double_quant: args.double_quant,
        compute_dtype: args.compute_dtype,
    };
    let out = AtomicDir::create(&args.out, args.overwrite)?;
    let written = write_checkpoint(
        &config,
        source.as_ref(),
        &config_path,
        Some(four_bit),
        args.dtype,
        &out,
        |_, _, _| Ok(()),
    )?;
    copy_companion_files(dir, &out)?;
    let target = out.commit()?;
    eprintln!(
        "wrote {}: {} weights in {} (blocksize {}{}), {} tensors kept, {:.1} MiB of tensor data",
        target.display(),
        written.quantized,
        args.quan,
        args.blocksize,
        if args.double_quant {
            ", double quant"
        } else {
            ""
        },
        written.kept,
        written.bytes as f64 / (1 << 20) as f64,
    );
    Ok(())
}

/// How [`write_checkpoint`] stores the linear weights in 4 bits (`BitsAndBytesConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FourBit {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`.
    pub compute_dtype: DType,
}

/// What [`write_checkpoint`] wrote.
pub struct Written {
    /// Linear weights stored in 4 bits.
    pub quantized: usize,
    /// Tensors stored as floats.
    pub kept: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// Writes every tensor `config` describes, read from `source`, into `out` as `model.safetensors`
/// with its `config.json`: with `four_bit`, the linear weights quantized exactly as
/// transformers and bitsandbytes save them; every other tensor (all of them without `four_bit`)
/// as a float in `dtype`, or its own dtype when `None`. `on_quantized(name, weights, shape)`
/// sees each linear weight as it goes into the quantizer. Names, shapes and dtypes are checked
/// against `config_path` before anything is written.
pub fn write_checkpoint(
    config: &ModelConfig,
    source: &dyn TensorSource,
    config_path: &Path,
    four_bit: Option<FourBit>,
    dtype: Option<DType>,
    out: &AtomicDir,
    mut on_quantized: impl FnMut(&str, FloatSlice<'_>, &[usize]) -> Result<()>,
) -> Result<Written> {
    let plan = plan(config, source, config_path, dtype)?;
    let total: u64 = plan.iter().map(|(_, spec, _)| spec_numel(spec)).sum();
    let bar = progress::params_bar(
        total,
        if four_bit.is_some() {
            "quantizing"
        } else {
            "writing"
        },
    );
    let mut spill = Spill::new(out.path())?;
    let (mut quantized, mut kept) = (0usize, 0usize);
    for (name, spec, dtype) in &plan {
        bar.set_message(name.clone());
        let tensor = cast(source.read(name)?, *dtype, source, name)?;
        match four_bit {
            Some(q) if spec.role == TensorRole::LinearWeight => {
                let data = FloatData::from_le_bytes(tensor.dtype, &tensor.data)?;
                on_quantized(name, data.as_slice(), &tensor.shape)?;
                let packed = quant::quantize_4bit(
                    data.as_slice(),
                    &tensor.shape,
                    q.quant_type,
                    q.blocksize,
                    q.double_quant,
                )
                .with_context(|| format!("quantizing `{name}`"))?;
                for (piece, raw) in bnb4bit::serialize(name, &packed) {
                    spill.push(piece, &raw)?;
                }
                quantized += 1;
            }
            _ => {
                spill.push(name.clone(), &tensor)?;
                kept += 1;
            }
        }
        bar.inc(spec_numel(spec));
    }
    let bytes = spill.data_len();
    spill.finish(&out.join("model.safetensors"))?;
    bar.finish_and_clear();
    let quantization = four_bit
        .map(|q| QuantizationConfig::bnb_4bit(q.quant_type, q.double_quant, q.compute_dtype));
    write_config(config, quantization, dtype, &out.join("config.json"))?;
    Ok(Written {
        quantized,
        kept,
        bytes,
    })
}

/// Copies the files of model directory `dir` that are not weights (tokenizer, generation
/// config) into `out`.
pub fn copy_companion_files(dir: &Path, out: &AtomicDir) -> Result<()> {
    for name in COMPANION_FILES {
        let from = dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, out.join(name))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    Ok(())
}

/// Every tensor to write, in the checkpoint's (sorted) order, with its spec and the dtype to
/// store it in (`dtype`, or its own). Checks names, shapes and dtypes against `config.json` before any work is done.
fn plan(
    config: &ModelConfig,
    source: &dyn TensorSource,
    config_path: &Path,
    dtype: Option<DType>,
) -> Result<Vec<(String, TensorSpec, DType)>> {
    let specs: BTreeMap<String, TensorSpec> = config
        .describe()
        .tensors()
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    let infos = source.tensor_infos();
    let mut plan = Vec::with_capacity(specs.len());
    let mut unknown = Vec::new();
    for info in infos {
        let file = source.file_of(&info.name).unwrap_or_default();
        let Some(spec) = specs.get(&info.name) else {
            unknown.push(info.name);
            continue;
        };
        if info.shape != spec.shape {
            bail!(
                "{file}: tensor `{}` has shape {:?}, but {} says {:?}",
                info.name,
                info.shape,
                config_path.display(),
                spec.shape
            );
        }
        if !info.dtype.is_float() || info.dtype == DType::F64 {
            bail!(
                "{file}: tensor `{}` is {}, expected float32, bfloat16 or float16",
                info.name,
                info.dtype
            );
        }
        plan.push((info.name, spec.clone(), dtype.unwrap_or(info.dtype)));
    }
    if !unknown.is_empty() {
        // transformers drops tensors its model does not have when it loads, so they are not in
        // its 4-bit checkpoint either.
        tracing::warn!(
            "left out {} tensor(s) that a {} model does not have: {}",
            unknown.len(),
            config.architecture(),
            unknown.join(", ")
        );
    }
    let present: std::collections::BTreeSet<&str> =
        plan.iter().map(|(n, _, _)| n.as_str()).collect();
    if let Some(missing) = specs.keys().find(|n| !present.contains(n.as_str())) {
        bail!(
            "{}: tensor `{missing}` that {} calls for is missing",
            source
                .file_of(missing)
                .unwrap_or_else(|| "the checkpoint".into()),
            config_path.display()
        );
    }
    Ok(plan)
}

fn spec_numel(spec: &TensorSpec) -> u64 {
    spec.shape.iter().product::<usize>() as u64
}

/// `tensor` in `to`, rounding to nearest even as torch's casts do.
fn cast(tensor: RawTensor, to: DType, source: &dyn TensorSource, name: &str) -> Result<RawTensor> {
    match to {
        to if to != tensor.dtype => {
            let values = tensor.to_f32().with_context(|| {
                format!(
                    "{}: tensor `{name}` is {}, not a float type",
                    source.file_of(name).unwrap_or_default(),
                    tensor.dtype
                )
            })?;
            Ok(RawTensor {
                dtype: to,
                shape: tensor.shape,
                data: qlora_core::dtype::from_f32(to, &values),
            })
        }
        _ => Ok(tensor),
    }
}

/// The source `config.json` with `quantization` as its `quantization_config` (none: a
/// full-precision checkpoint) and the new `dtype` where one was asked for, written as
/// transformers writes it: keys sorted, two-space indent, newline.
fn write_config(
    config: &ModelConfig,
    quantization: Option<QuantizationConfig>,
    dtype: Option<DType>,
    path: &Path,
) -> Result<()> {
    let mut raw = config.raw.clone();
    let object = raw
        .as_object_mut()
        .context("config.json is not a JSON object")?;
    match quantization {
        Some(q) => object.insert("quantization_config".into(), q.raw),
        None => object.remove("quantization_config"),
    };
    if let Some(dtype) = dtype {
        object.insert("dtype".into(), dtype.torch_name().into());
    }
    let text = serde_json::to_string_pretty(&raw)? + "\n";
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
