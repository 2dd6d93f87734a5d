//! A base model (HF directory, 4-bit directory or GGUF) with an optional saved PEFT adapter,
//! ready to generate on the CPU or on a CUDA device.

use std::path::Path;

use anyhow::{Context, Result};
use qlora_core::arch::{ModelConfig, PeftNaming};
use qlora_core::checkpoint::{open_file, TensorSource};
use qlora_core::peft::AdapterConfig;
use qlora_core::prompt::PromptTemplate;
use qlora_core::tokenizer::Tokenizer;

use super::Generator;
use crate::cpu::{LoraInit, LoraSetup, Model};
use crate::cuda::{CudaModel, CudaOptions, Gpu, Precision};
use crate::load::{load_base, QuantOnLoad};

/// What generation needs: the model, its tokenizer and its prompt template.
pub struct GenerationModel {
    pub model: Box<dyn Generator>,
    pub tokenizer: Tokenizer,
    pub template: PromptTemplate,
}

/// Where a model generates.
#[derive(Clone)]
pub enum GenerationDevice {
    Cpu,
    /// The base stays 4-bit on the GPU; `merge_adapter` folds the adapter into a dense copy of
    /// each adapted weight (faster prefill, slower decoding, more memory: the README has the
    /// figures) instead of applying it unmerged.
    Cuda {
        gpu: Gpu,
        precision: Precision,
        merge_adapter: bool,
    },
}

/// Loads the base at `path` (see [`load_base`]) and, when `adapter` names a directory saved by
/// PEFT (`adapter_config.json`, `adapter_model.safetensors`), its LoRA adapters, onto `device`.
pub fn load_for_generation(
    path: &Path,
    adapter: Option<&Path>,
    quant: Option<QuantOnLoad>,
    prompt_template: Option<&str>,
    device: GenerationDevice,
) -> Result<GenerationModel> {
    let base = load_base(path, quant, prompt_template)?;
    let model: Box<dyn Generator> = match device {
        GenerationDevice::Cpu => Box::new(load_model(&base.config, &*base.weights, adapter)?),
        GenerationDevice::Cuda {
            gpu,
            precision,
            merge_adapter,
        } => Box::new(load_cuda_model(
            &gpu,
            &base.config,
            &*base.weights,
            adapter,
            precision,
            merge_adapter,
        )?),
    };
    Ok(GenerationModel {
        model,
        tokenizer: base.tokenizer,
        template: base.template,
    })
}

/// The CUDA model of `config` from `weights` (4-bit weights stay packed), with the LoRA adapters
/// of the PEFT directory `adapter` when given, merged into dense copies when `merge_adapter`,
/// and ready to decode.
pub fn load_cuda_model(
    gpu: &Gpu,
    config: &ModelConfig,
    weights: &dyn TensorSource,
    adapter: Option<&Path>,
    precision: Precision,
    merge_adapter: bool,
) -> Result<CudaModel> {
    let options = CudaOptions {
        precision,
        gradient_checkpointing: false,
    };
    let mut model = with_adapter(adapter, |setup| {
        Ok(CudaModel::load(gpu, config, weights, setup, options)?)
    })?;
    model.prepare_decoding(merge_adapter)?;
    Ok(model)
}

/// The CPU model of `config` from `weights`, with the LoRA adapters of the PEFT directory
/// `adapter` when given.
pub fn load_model(
    config: &ModelConfig,
    weights: &dyn TensorSource,
    adapter: Option<&Path>,
) -> Result<Model> {
    with_adapter(adapter, |setup| Ok(Model::load(config, weights, setup)?))
}

/// `load` given the LoRA setup of the PEFT directory `adapter` (`None` without one).
pub fn with_adapter<M>(
    adapter: Option<&Path>,
    load: impl FnOnce(Option<&LoraSetup<'_>>) -> Result<M>,
) -> Result<M> {
    let Some(dir) = adapter else {
        return load(None);
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
    load(Some(&setup)).with_context(|| format!("the adapter in {}", dir.display()))
}
