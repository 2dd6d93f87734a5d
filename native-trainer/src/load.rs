//! Loading a base model for training or generation: its config, its weights as a
//! [`TensorSource`], its tokenizer and its prompt template, from whatever `--model_name_or_path`
//! names: an HF directory (full precision or 4-bit) or a LLaMA-family `.gguf` file.

use std::path::Path;

use anyhow::{bail, Context, Result};
use qlora_core::arch::{Architecture, ModelConfig};
use qlora_core::checkpoint::bnb4bit::{Dequantizing, QuantizeOnRead};
use qlora_core::checkpoint::{open_checkpoint, TensorSource};
use qlora_core::gguf::GgufCheckpoint;
use qlora_core::prompt::PromptTemplate;
use qlora_core::quant::QuantType;
use qlora_core::tokenizer::Tokenizer;

/// How to quantize a full-precision base on load (QLoRA's frozen 4-bit base).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantOnLoad {
    pub quant_type: QuantType,
    pub double_quant: bool,
    pub blocksize: usize,
}

/// Whether the base weights the model computes with are 4-bit, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseWeights {
    /// Full precision as stored.
    Full,
    /// A 4-bit checkpoint, dequantized as it is read.
    Stored4bit,
    /// Full precision quantized on load.
    Quantized(QuantOnLoad),
}

pub type Weights = Box<dyn TensorSource + Send + Sync>;

/// Everything a run needs to know about its base model.
pub struct BaseModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    pub template: PromptTemplate,
    pub base_weights: BaseWeights,
}

/// A base model's config, weights (a 4-bit checkpoint dequantized as it is read) and tokenizer,
/// as stored: nothing quantized on load, no prompt template chosen.
pub struct OpenedBase {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    /// Whether the checkpoint is 4-bit (its weights read dequantized).
    pub stored_4bit: bool,
}

/// Opens `path`: an HF directory (full precision or 4-bit) or a LLaMA-family `.gguf` file.
pub fn open_base(path: &Path) -> Result<OpenedBase> {
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf {
        let ckpt = GgufCheckpoint::open(path)?;
        let tokenizer = Tokenizer::from_gguf(ckpt.gguf())
            .with_context(|| format!("the tokenizer of {}", path.display()))?;
        Ok(OpenedBase {
            config: ckpt.config().clone(),
            weights: Box::new(ckpt),
            tokenizer,
            stored_4bit: false,
        })
    } else if path.is_dir() {
        let (config, weights, stored_4bit) = open_hf_weights(path)?;
        let tokenizer = Tokenizer::from_hf_dir(path)
            .with_context(|| format!("the tokenizer of {}", path.display()))?;
        Ok(OpenedBase {
            config,
            weights,
            tokenizer,
            stored_4bit,
        })
    } else {
        bail!("{}: not a model directory nor a .gguf file", path.display());
    }
}

/// The config and weights of the HF checkpoint directory `dir` (no tokenizer needed), a 4-bit
/// one dequantized as it is read; the flag says whether it is 4-bit.
pub fn open_hf_weights(dir: &Path) -> Result<(ModelConfig, Weights, bool)> {
    let config = ModelConfig::load(&dir.join("config.json"))?;
    let source = open_checkpoint(dir)?;
    Ok(if config.quantization.is_some() {
        (config, Box::new(Dequantizing::new(source)), true)
    } else {
        (config, source, false)
    })
}

/// Loads `path` (see [`open_base`]). `quant` quantizes a full-precision base on load (ignored,
/// with a note, for a checkpoint that is already 4-bit). `prompt_template` overrides the model's
/// own template (see [`PromptTemplate::from_format`]).
pub fn load_base(
    path: &Path,
    quant: Option<QuantOnLoad>,
    prompt_template: Option<&str>,
) -> Result<BaseModel> {
    let OpenedBase {
        config,
        weights,
        tokenizer,
        stored_4bit,
    } = open_base(path)?;
    let (weights, base_weights): (Weights, BaseWeights) = match (quant, stored_4bit) {
        (_, true) => {
            if quant.is_some() {
                tracing::info!(
                    "{} is already 4-bit: --quan is not applied again",
                    path.display()
                );
            }
            (weights, BaseWeights::Stored4bit)
        }
        (Some(q), false) => (
            quantize_on_read(&config, weights, q)?,
            BaseWeights::Quantized(q),
        ),
        (None, false) => (weights, BaseWeights::Full),
    };
    let template = match prompt_template {
        Some(format) => PromptTemplate::from_format(format)?,
        None if config.architecture() == Architecture::Bloom => PromptTemplate::yayi(),
        None => PromptTemplate::from_tokenizer(&tokenizer).with_context(|| {
            format!(
                "{} has no chat template: give one with --prompt_template",
                path.display()
            )
        })?,
    };
    Ok(BaseModel {
        config,
        weights,
        tokenizer,
        template,
        base_weights,
    })
}

/// `weights` with the linear projections of `config` quantized on read (see [`QuantizeOnRead`]).
pub fn quantize_on_read(config: &ModelConfig, weights: Weights, q: QuantOnLoad) -> Result<Weights> {
    let linear = config
        .describe()
        .linears()
        .into_iter()
        .map(|l| l.weight_name())
        .collect::<Vec<_>>();
    Ok(Box::new(QuantizeOnRead::new(
        weights,
        linear,
        q.quant_type,
        q.blocksize,
        q.double_quant,
    )?))
}
