//! Model architectures: what a `config.json` says, and the one description of each architecture's
//! tensors (names, shapes, roles) that every backend (CPU, CUDA, WGSL) and the quantizer share.
//!
//! - [`ModelConfig::parse`] reads a transformers `config.json` (`bloom`, `llama`, `qwen2`),
//!   its optional `quantization_config` block, and keeps the raw JSON.
//! - [`ModelConfig::describe`] gives an [`ArchDescription`]: typed, per-layer module specs for the
//!   backends, and [`ArchDescription::tensors`] / [`ArchDescription::linears`] as flat lists for
//!   loaders and quantizers.
//! - [`lora`] holds the LoRA hyper-parameters, target matching and PEFT tensor names.

pub mod bloom;
mod json;
pub mod llama;
pub mod lora;
pub mod quantization;

use crate::{Error, Result};

pub use bloom::{BloomConfig, BloomDescription, BloomLayer};
pub use llama::{LlamaConfig, LlamaDescription, LlamaLayer, RopeLayout};
pub use lora::{
    parse_peft_tensor_name, peft_tensor_name, LoraConfig, LoraMatrix, PeftNaming, TargetModules,
};
pub use quantization::{QuantType, QuantizationConfig};

/// The `model_type` of a `config.json` that qlora can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    Bloom,
    Llama,
    Qwen2,
}

impl Architecture {
    /// The `model_type` string of transformers.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Bloom => "bloom",
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }

    pub fn from_model_type(model_type: &str) -> Option<Architecture> {
        match model_type {
            "bloom" => Some(Architecture::Bloom),
            "llama" => Some(Architecture::Llama),
            "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    /// The prefix of the base model's tensors in a `*ForCausalLM` checkpoint. Checkpoints saved
    /// from the bare base model (e.g. `bigscience/bloom-7b1`) lack it, and transformers accepts
    /// both.
    pub fn base_model_prefix(self) -> &'static str {
        match self {
            Architecture::Bloom => "transformer.",
            Architecture::Llama | Architecture::Qwen2 => "model.",
        }
    }

    /// The modules PEFT adapts when none are named: BLOOM's fused attention input, and every
    /// linear projection of a LLaMA-family layer (the QLoRA paper's choice).
    pub const fn default_lora_targets(self) -> &'static [&'static str] {
        match self {
            Architecture::Bloom => &["query_key_value"],
            Architecture::Llama | Architecture::Qwen2 => &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// The hyper-parameters of one architecture family.
#[derive(Debug, Clone, PartialEq)]
pub enum ArchConfig {
    Bloom(BloomConfig),
    /// `llama` and `qwen2` (see [`LlamaConfig::arch`]).
    Llama(LlamaConfig),
}

/// A parsed `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: ArchConfig,
    /// The `quantization_config` block of a checkpoint saved in 4 (or 8) bits.
    pub quantization: Option<QuantizationConfig>,
    /// The whole file as it was, for writing it back and for fields qlora does not model.
    pub raw: serde_json::Value,
}

impl ModelConfig {
    /// Parses the text of a `config.json`; `origin` (usually the path) names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ModelConfig> {
        let raw: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::format(origin, format!("not valid JSON: {e}")))?;
        let fields = json::Fields::new(&raw, origin)?;
        let model_type = fields.req_str("model_type")?;
        let architecture = Architecture::from_model_type(model_type).ok_or_else(|| {
            Error::format(
                origin,
                format!("model_type `{model_type}` is not supported (bloom, llama, qwen2 are)"),
            )
        })?;
        let arch = match architecture {
            Architecture::Bloom => ArchConfig::Bloom(BloomConfig::from_fields(&fields)?),
            Architecture::Llama | Architecture::Qwen2 => {
                ArchConfig::Llama(LlamaConfig::from_fields(&fields, architecture)?)
            }
        };
        let quantization = match raw.get("quantization_config") {
            None | Some(serde_json::Value::Null) => None,
            Some(block) => Some(QuantizationConfig::from_json(block, origin)?),
        };
        let config = ModelConfig {
            arch,
            quantization,
            raw,
        };
        config.check_sizes(origin)?;
        Ok(config)
    }

    /// Refuses a config whose layer count or tensor sizes no real model has: `describe()` lists
    /// every layer, and callers multiply tensor shapes out.
    fn check_sizes(&self, origin: &str) -> Result<()> {
        if self.num_layers() > MAX_LAYERS {
            return Err(Error::format(
                origin,
                format!(
                    "{} layers is more than the {MAX_LAYERS} qlora accepts",
                    self.num_layers()
                ),
            ));
        }
        for tensor in self.describe().tensors() {
            let bytes = tensor
                .shape
                .iter()
                .try_fold(std::mem::size_of::<f64>(), |n, &d| n.checked_mul(d));
            if bytes.is_none() {
                return Err(Error::format(
                    origin,
                    format!(
                        "tensor `{}` of shape {:?} is larger than memory can address",
                        tensor.name, tensor.shape
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads and parses a `config.json` file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load(path: &std::path::Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        ModelConfig::parse(&text, &path.display().to_string())
    }

    pub fn architecture(&self) -> Architecture {
        match &self.arch {
            ArchConfig::Bloom(_) => Architecture::Bloom,
            ArchConfig::Llama(c) => c.arch,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.arch {
            ArchConfig::Bloom(c) => c.vocab_size,
            ArchConfig::Llama(c) => c.vocab_size,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match &self.arch {
            ArchConfig::Bloom(c) => c.hidden_size,
            ArchConfig::Llama(c) => c.hidden_size,
        }
    }

    pub fn num_layers(&self) -> usize {
        match &self.arch {
            ArchConfig::Bloom(c) => c.n_layer,
            ArchConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    /// The names, shapes and roles of the model's tensors, as transformers saves them.
    pub fn describe(&self) -> ArchDescription {
        match &self.arch {
            ArchConfig::Bloom(c) => ArchDescription::Bloom(c.describe()),
            ArchConfig::Llama(c) => ArchDescription::Llama(c.describe()),
        }
    }
}

/// The most layers a `config.json` may declare: far above any released model (Llama 3.1 405B has
/// 126), low enough that describing a lying config stays small.
const MAX_LAYERS: usize = 4096;

/// What a tensor of a checkpoint is for. Only [`TensorRole::LinearWeight`] tensors are quantized
/// to 4 bits (transformers keeps embeddings, norms, biases and the LM head in full precision) and
/// only their modules can carry a LoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorRole {
    Embedding,
    NormWeight,
    NormBias,
    LinearWeight,
    LinearBias,
    /// An untied output projection (`lm_head.weight`).
    LmHead,
}

/// One tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: TensorRole,
}

/// A linear projection `y = x W^T (+ b)` with `W` `[out_features, in_features]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    /// Module path in the model, e.g. `transformer.h.0.self_attention.query_key_value`; PEFT
    /// names and LoRA target matching use it.
    pub module: String,
    /// The last component of `module` (`query_key_value`, `q_proj`, ...).
    pub kind: &'static str,
    pub in_features: usize,
    pub out_features: usize,
    pub has_bias: bool,
}

impl LinearSpec {
    fn new(
        layer_prefix: &str,
        kind: &'static str,
        in_features: usize,
        out_features: usize,
        has_bias: bool,
    ) -> LinearSpec {
        LinearSpec {
            module: format!("{layer_prefix}.{kind}"),
            kind,
            in_features,
            out_features,
            has_bias,
        }
    }

    /// `<module>.weight`, shape `[out_features, in_features]`.
    pub fn weight_name(&self) -> String {
        format!("{}.weight", self.module)
    }

    /// `<module>.bias`, shape `[out_features]`, when the projection has one.
    pub fn bias_name(&self) -> Option<String> {
        self.has_bias.then(|| format!("{}.bias", self.module))
    }

    fn tensors(&self, out: &mut Vec<TensorSpec>) {
        out.push(TensorSpec {
            name: self.weight_name(),
            shape: vec![self.out_features, self.in_features],
            role: TensorRole::LinearWeight,
        });
        if let Some(name) = self.bias_name() {
            out.push(TensorSpec {
                name,
                shape: vec![self.out_features],
                role: TensorRole::LinearBias,
            });
        }
    }
}

/// Which normalization a [`NormSpec`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) * weight + bias` (biased variance), as `torch.nn.LayerNorm`.
    LayerNorm,
    /// `x / sqrt(mean(x^2) + eps) * weight`, as `LlamaRMSNorm`.
    RmsNorm,
}

/// A normalization over the last dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct NormSpec {
    pub module: String,
    pub kind: NormKind,
    pub dim: usize,
    pub eps: f64,
}

impl NormSpec {
    fn new(module: impl Into<String>, kind: NormKind, dim: usize, eps: f64) -> NormSpec {
        NormSpec {
            module: module.into(),
            kind,
            dim,
            eps,
        }
    }

    /// `<module>.weight`, shape `[dim]`.
    pub fn weight_name(&self) -> String {
        format!("{}.weight", self.module)
    }

    /// `<module>.bias`, shape `[dim]`, for a LayerNorm.
    pub fn bias_name(&self) -> Option<String> {
        (self.kind == NormKind::LayerNorm).then(|| format!("{}.bias", self.module))
    }

    fn tensors(&self, out: &mut Vec<TensorSpec>) {
        out.push(TensorSpec {
            name: self.weight_name(),
            shape: vec![self.dim],
            role: TensorRole::NormWeight,
        });
        if let Some(name) = self.bias_name() {
            out.push(TensorSpec {
                name,
                shape: vec![self.dim],
                role: TensorRole::NormBias,
            });
        }
    }
}

/// A `[vocab_size, hidden_size]` matrix: the token embedding, or an untied LM head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingSpec {
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
}

impl EmbeddingSpec {
    fn tensor(&self, role: TensorRole) -> TensorSpec {
        TensorSpec {
            name: self.name.clone(),
            shape: vec![self.vocab_size, self.hidden_size],
            role,
        }
    }
}

/// Where the logits come from: `logits = h W^T` with `W` the token embedding (tied) or its own
/// `lm_head.weight`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LmHead {
    TiedToEmbedding,
    Separate(EmbeddingSpec),
}

/// The tensors of one model, typed per architecture for the backends.
#[derive(Debug, Clone, PartialEq)]
pub enum ArchDescription {
    Bloom(BloomDescription),
    Llama(LlamaDescription),
}

impl ArchDescription {
    pub fn architecture(&self) -> Architecture {
        match self {
            ArchDescription::Bloom(_) => Architecture::Bloom,
            ArchDescription::Llama(d) => d.config.arch,
        }
    }

    /// The token embedding `[V, H]`.
    pub fn token_embedding(&self) -> &EmbeddingSpec {
        match self {
            ArchDescription::Bloom(d) => &d.word_embeddings,
            ArchDescription::Llama(d) => &d.embed_tokens,
        }
    }

    /// Every tensor the checkpoint must hold, in model order.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        match self {
            ArchDescription::Bloom(d) => d.tensors(),
            ArchDescription::Llama(d) => d.tensors(),
        }
    }

    /// Every linear projection (the 4-bit quantized modules and the possible LoRA targets), layer
    /// by layer. The LM head is not among them: transformers keeps it in full precision.
    pub fn linears(&self) -> Vec<&LinearSpec> {
        match self {
            ArchDescription::Bloom(d) => d.layers.iter().flat_map(|l| l.linears()).collect(),
            ArchDescription::Llama(d) => d.layers.iter().flat_map(|l| l.linears()).collect(),
        }
    }

    pub fn default_lora_targets(&self) -> &'static [&'static str] {
        self.architecture().default_lora_targets()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_model_type_naming_the_file() {
        let err = ModelConfig::parse(r#"{"model_type": "gpt2"}"#, "x/config.json").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("x/config.json") && msg.contains("gpt2"),
            "{msg}"
        );
    }

    /// Lying sizes that overflowed `usize` in `describe()` or made it list billions of layers
    /// (regression inputs in fuzz/corpus/model_config/).
    #[test]
    fn rejects_sizes_no_model_has() {
        let cases = [
            (
                r#"{"model_type": "bloom", "vocab_size": 8, "hidden_size": 4611686018427387904, "n_layer": 1, "n_head": 1}"#,
                "hidden_size 4611686018427387904 is too large",
            ),
            (
                r#"{"model_type": "llama", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4294967296, "head_dim": 4294967296}"#,
                "head_dim 4294967296 is too large",
            ),
            (
                r#"{"model_type": "bloom", "vocab_size": 8, "hidden_size": 64, "n_layer": 1000000000000, "n_head": 1}"#,
                "1000000000000 layers is more than",
            ),
            (
                r#"{"model_type": "bloom", "vocab_size": 4294967296, "hidden_size": 4294967296, "n_layer": 1, "n_head": 1}"#,
                "is larger than memory can address",
            ),
        ];
        for (json, expected) in cases {
            let err = ModelConfig::parse(json, "config.json")
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("config.json: ") && err.contains(expected),
                "{err}"
            );
        }
    }

    #[test]
    fn rejects_bad_json() {
        let err = ModelConfig::parse("{", "c.json").unwrap_err();
        assert!(
            err.to_string().starts_with("c.json: not valid JSON"),
            "{err}"
        );
    }
}
