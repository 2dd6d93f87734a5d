//! A base model (HF directory, 4-bit directory or GGUF) with an optional saved PEFT adapter,
//! ready to generate on the CPU.

use std::path::Path;

use anyhow::{Context, Result};
use qlora_core::arch::{ModelConfig, PeftNaming};
use qlora_core::checkpoint::{open_file, TensorSource};
use qlora_core::peft::AdapterConfig;
use qlora_core::prompt::PromptTemplate;
use qlora_core::tokenizer::Tokenizer;

use crate::cpu::{LoraInit, LoraSetup, Model};
use crate::load::{load_base, QuantOnLoad};

/// What generation needs: the model, its tokenizer and its prompt template.
pub struct GenerationModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: PromptTemplate,
}

/// Loads the base at `path` (see [`load_base`]) and, when `adapter` names a directory saved by
/// PEFT (`adapter_config.json`, `adapter_model.safetensors`), its LoRA adapters.
pub fn load_for_generation(
    path: &Path,
    adapter: Option<&Path>,
    quant: Option<QuantOnLoad>,
    prompt_template: Option<&str>,
) -> Result<GenerationModel> {
    let base = load_base(path, quant, prompt_template)?;
    Ok(GenerationModel {
        model: load_model(&base.config, &*base.weights, adapter)?,
        tokenizer: base.tokenizer,
        template: base.template,
    })
}

/// The CPU model of `config` from `weights`, with the LoRA adapters of the PEFT directory
/// `adapter` when given.
pub fn load_model(
    config: &ModelConfig,
    weights: &dyn TensorSource,
    adapter: Option<&Path>,
) -> Result<Model> {
    let Some(dir) = adapter else {
        return Ok(Model::load(config, weights, None)?);
    };
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("{}", config_path.display()))?;
    let adapter_config = AdapterConfig::from_json(&config_path.display().to_string(), &text)?;
    let adapter_weights = open_file(&dir.join("adapter_model.safetensors"))?;
    let setup = LoraSetup {
        config: adapter_config.lora,
        init: LoraInit::FromSource {
            source: &*adapter_weights,
            naming: PeftNaming::Saved,
        },
    };
    Model::load(config, weights, Some(&setup))
        .with_context(|| format!("the adapter in {}", dir.display()))
}
