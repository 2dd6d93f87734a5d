//! The LLaMA family (`model_type: llama`, `qwen2`): hyper-parameters, tensor layout and RoPE.
//!
//! Layer `i` (prefix `model.layers.{i}`), hidden size `H`, `n_q` query heads and `n_kv` key/value
//! heads of `head_dim` `d`, intermediate size `I`:
//! - `input_layernorm` (RMSNorm `[H]`)
//! - `self_attn.q_proj` `[n_q d, H]`, `k_proj` / `v_proj` `[n_kv d, H]` (biases for qwen2, or
//!   llama with `attention_bias`), `o_proj` `[H, n_q d]` (bias for llama with `attention_bias`)
//! - `post_attention_layernorm` (RMSNorm)
//! - `mlp.gate_proj` / `up_proj` `[I, H]`, `down_proj` `[H, I]`: `down(silu(gate(x)) * up(x))`
//!
//! Around the layers: `model.embed_tokens` `[V, H]`, `model.norm`, and `lm_head.weight` unless
//! `tie_word_embeddings`.

use super::json::Fields;
use super::{
    Architecture, EmbeddingSpec, LinearSpec, LmHead, NormKind, NormSpec, TensorRole, TensorSpec,
};
use crate::Result;

/// Which pairs of a head's `d` channels RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Channel `j` with `j + d/2` (transformers' `rotate_half`): HF checkpoints.
    HalfSplit,
    /// Channel `2j` with `2j + 1` (llama.cpp's "NORM" rope): GGUF checkpoints, whose converter
    /// permuted the rows of `q_proj` / `k_proj` into this order.
    AdjacentPairs,
}

/// The fields of a LLaMA / Qwen2 `config.json` that the forward pass depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// [`Architecture::Llama`] or [`Architecture::Qwen2`].
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Not a `config.json` field: HF checkpoints use [`RopeLayout::HalfSplit`]; a GGUF reader sets
    /// [`RopeLayout::AdjacentPairs`].
    pub rope_layout: RopeLayout,
    /// Biases on `q_proj`, `k_proj`, `v_proj`.
    pub qkv_bias: bool,
    pub o_proj_bias: bool,
    /// Biases on `gate_proj`, `up_proj`, `down_proj`.
    pub mlp_bias: bool,
    /// Dropout on the attention probabilities, in training mode.
    pub attention_dropout: f64,
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// Reads the fields with transformers' defaults. RoPE scaling other than `default`, activations
    /// other than `silu` and Qwen2's sliding window are refused rather than computed wrongly.
    pub(crate) fn from_fields(f: &Fields<'_>, arch: Architecture) -> Result<LlamaConfig> {
        let hidden_size = f.req_usize_any(&["hidden_size"])?;
        let num_attention_heads = f.req_usize_any(&["num_attention_heads"])?;
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(f.error(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of \
                 num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(num_attention_heads) => {
                hidden_size / num_attention_heads
            }
            None => {
                return Err(f.error(format!(
                    "hidden_size {hidden_size} is not a multiple of num_attention_heads \
                     {num_attention_heads} and no head_dim is given"
                )))
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(f.error(format!("head_dim {head_dim} is odd: RoPE needs pairs")));
        }
        // `describe()` sizes q_proj as num_attention_heads * head_dim.
        if num_attention_heads.checked_mul(head_dim).is_none() {
            return Err(f.error(format!(
                "num_attention_heads {num_attention_heads} * head_dim {head_dim} is too large"
            )));
        }
        let hidden_act = f.opt_str("hidden_act")?.unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(f.error(format!(
                "hidden_act `{hidden_act}` is not supported (silu is)"
            )));
        }
        if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
            return Err(f.error("use_sliding_window is not supported"));
        }
        let (qkv_bias, o_proj_bias) = match arch {
            Architecture::Qwen2 => (true, false),
            _ => {
                let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
                (bias, bias)
            }
        };
        Ok(LlamaConfig {
            arch,
            vocab_size: f.req_usize_any(&["vocab_size"])?,
            hidden_size,
            intermediate_size: f.req_usize_any(&["intermediate_size"])?,
            num_hidden_layers: f.req_usize_any(&["num_hidden_layers"])?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope_theta(f)?,
            rope_layout: RopeLayout::HalfSplit,
            qkv_bias,
            o_proj_bias,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            attention_dropout: f.opt_probability("attention_dropout")?.unwrap_or(0.0),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        })
    }

    /// Query heads per key/value head (grouped-query attention).
    pub fn kv_group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// `inv_freq[j] = 1 / theta^(2j / d)` for `j < d/2`, as transformers' default RoPE computes
    /// it in f32: the exponent `2j / d` and `theta^e` rounded to f32, then the reciprocal.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim as f32;
        (0..self.head_dim / 2)
            .map(|j| {
                let exponent = (2 * j) as f32 / d;
                let power = self.rope_theta.powf(f64::from(exponent)) as f32;
                1.0 / power
            })
            .collect()
    }

    pub fn describe(&self) -> LlamaDescription {
        let h = self.hidden_size;
        let q_out = self.num_attention_heads * self.head_dim;
        let kv_out = self.num_key_value_heads * self.head_dim;
        let i_size = self.intermediate_size;
        let rms = |module: String| NormSpec::new(module, NormKind::RmsNorm, h, self.rms_norm_eps);
        let layers = (0..self.num_hidden_layers)
            .map(|i| {
                let prefix = format!("model.layers.{i}");
                let attn = format!("{prefix}.self_attn");
                let mlp = format!("{prefix}.mlp");
                LlamaLayer {
                    input_layernorm: rms(format!("{prefix}.input_layernorm")),
                    q_proj: LinearSpec::new(&attn, "q_proj", h, q_out, self.qkv_bias),
                    k_proj: LinearSpec::new(&attn, "k_proj", h, kv_out, self.qkv_bias),
                    v_proj: LinearSpec::new(&attn, "v_proj", h, kv_out, self.qkv_bias),
                    o_proj: LinearSpec::new(&attn, "o_proj", q_out, h, self.o_proj_bias),
                    post_attention_layernorm: rms(format!("{prefix}.post_attention_layernorm")),
                    gate_proj: LinearSpec::new(&mlp, "gate_proj", h, i_size, self.mlp_bias),
                    up_proj: LinearSpec::new(&mlp, "up_proj", h, i_size, self.mlp_bias),
                    down_proj: LinearSpec::new(&mlp, "down_proj", i_size, h, self.mlp_bias),
                }
            })
            .collect();
        LlamaDescription {
            config: self.clone(),
            embed_tokens: EmbeddingSpec {
                name: "model.embed_tokens.weight".into(),
                vocab_size: self.vocab_size,
                hidden_size: h,
            },
            layers,
            norm: rms("model.norm".into()),
            lm_head: if self.tie_word_embeddings {
                LmHead::TiedToEmbedding
            } else {
                LmHead::Separate(EmbeddingSpec {
                    name: "lm_head.weight".into(),
                    vocab_size: self.vocab_size,
                    hidden_size: h,
                })
            },
        }
    }
}

/// `rope_theta` from transformers 5's `rope_parameters` or 4's top-level field (default 10000);
/// a `rope_type` / `rope_scaling` other than the plain one is an error.
fn rope_theta(f: &Fields<'_>) -> Result<f64> {
    let parameters = f.opt_object("rope_parameters")?;
    let scaling = f.opt_object("rope_scaling")?;
    for block in [&parameters, &scaling].into_iter().flatten() {
        let rope_type = match block.opt_str("rope_type")? {
            Some(t) => Some(t),
            None => block.opt_str("type")?,
        };
        if let Some(t) = rope_type.filter(|&t| t != "default") {
            return Err(f.error(format!(
                "RoPE scaling `{t}` is not supported (only the default RoPE is)"
            )));
        }
    }
    let from_parameters = match &parameters {
        Some(p) => p.opt_f64("rope_theta")?,
        None => None,
    };
    let theta = match from_parameters {
        Some(t) => t,
        None => f.opt_f64("rope_theta")?.unwrap_or(10000.0),
    };
    if theta <= 0.0 {
        return Err(f.error(format!("rope_theta must be positive, found {theta}")));
    }
    Ok(theta)
}

/// The tensors of a LLaMA-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaDescription {
    pub config: LlamaConfig,
    pub embed_tokens: EmbeddingSpec,
    pub layers: Vec<LlamaLayer>,
    pub norm: NormSpec,
    pub lm_head: LmHead,
}

/// One decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaLayer {
    pub input_layernorm: NormSpec,
    pub q_proj: LinearSpec,
    pub k_proj: LinearSpec,
    pub v_proj: LinearSpec,
    pub o_proj: LinearSpec,
    pub post_attention_layernorm: NormSpec,
    pub gate_proj: LinearSpec,
    pub up_proj: LinearSpec,
    pub down_proj: LinearSpec,
}

impl LlamaLayer {
    pub fn linears(&self) -> [&LinearSpec; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
}

impl LlamaDescription {
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut out = vec![self.embed_tokens.tensor(TensorRole::Embedding)];
        for layer in &self.layers {
            layer.input_layernorm.tensors(&mut out);
            for linear in &layer.linears()[..4] {
                linear.tensors(&mut out);
            }
            layer.post_attention_layernorm.tensors(&mut out);
            for linear in &layer.linears()[4..] {
                linear.tensors(&mut out);
            }
        }
        self.norm.tensors(&mut out);
        if let LmHead::Separate(head) = &self.lm_head {
            out.push(head.tensor(TensorRole::LmHead));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{ArchConfig, ArchDescription, ModelConfig};

    const QWEN2: &str = r#"{"model_type": "qwen2", "vocab_size": 384, "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "hidden_act": "silu",
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "sliding_window": null, "use_sliding_window": false, "tie_word_embeddings": false}"#;

    fn llama_config(text: &str) -> LlamaConfig {
        match ModelConfig::parse(text, "config.json").unwrap().arch {
            ArchConfig::Llama(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_qwen2_with_biases_and_untied_head() {
        let c = llama_config(QWEN2);
        assert_eq!(c.arch, Architecture::Qwen2);
        assert_eq!((c.head_dim, c.kv_group_size()), (16, 2));
        assert_eq!(
            (c.qkv_bias, c.o_proj_bias, c.mlp_bias),
            (true, false, false)
        );
        assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-5, 10000.0));
        let description = c.describe();
        let tensors = description.tensors();
        // embed + 2 x (2 norms + 7 weights + 3 biases) + norm + lm_head
        assert_eq!(tensors.len(), 1 + 2 * 12 + 1 + 1);
        assert_eq!(tensors.last().unwrap().name, "lm_head.weight");
        assert_eq!(tensors.last().unwrap().role, TensorRole::LmHead);
        let k = &description.layers[1].k_proj;
        assert_eq!(k.module, "model.layers.1.self_attn.k_proj");
        assert_eq!((k.out_features, k.in_features), (32, 64));
        assert_eq!(
            k.bias_name().as_deref(),
            Some("model.layers.1.self_attn.k_proj.bias")
        );
        let linears = ArchDescription::Llama(description).linears().len();
        assert_eq!(linears, 14);
    }

    #[test]
    fn reads_transformers_4_rope_theta_and_llama_defaults() {
        let c = llama_config(
            r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_theta": 100000.0, "rope_scaling": null}"#,
        );
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!((c.qkv_bias, c.tie_word_embeddings), (false, false));
        assert_eq!(c.rms_norm_eps, 1e-6);
    }

    #[test]
    fn refuses_rope_scaling() {
        let text = QWEN2.replace("\"default\"", "\"llama3\"");
        let err = ModelConfig::parse(&text, "config.json").unwrap_err();
        assert!(err.to_string().contains("RoPE scaling `llama3`"), "{err}");
    }

    #[test]
    fn rope_inv_freq_is_theta_powers() {
        let c = llama_config(QWEN2);
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 8);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 10000f32.powf(-2.0 / 16.0)).abs() < 1e-7);
        assert!((f[7] - 10000f32.powf(-14.0 / 16.0)).abs() < 1e-9);
    }
}
