//! BLOOM (`model_type: bloom`, YaYi-7B): hyper-parameters, tensor layout and ALiBi slopes.
//!
//! Layer `i` (prefix `transformer.h.{i}`), hidden size `H`:
//! - `input_layernorm` (LayerNorm `[H]` weight + bias)
//! - `self_attention.query_key_value` `[3H, H]` + bias: q, k, v interleaved per head, i.e. its
//!   output viewed as `[.., n_head, 3, head_dim]` (transformers' `_reshape`)
//! - `self_attention.dense` `[H, H]` + bias
//! - `post_attention_layernorm` (LayerNorm)
//! - `mlp.dense_h_to_4h` `[4H, H]` + bias, tanh-GELU, `mlp.dense_4h_to_h` `[H, 4H]` + bias
//!
//! Around the layers: `transformer.word_embeddings` `[V, H]`, `transformer.word_embeddings_layernorm`,
//! `transformer.ln_f`, and the LM head tied to the word embeddings.

use super::json::Fields;
use super::{EmbeddingSpec, LinearSpec, LmHead, NormKind, NormSpec, TensorRole, TensorSpec};
use crate::Result;

/// The fields of a BLOOM `config.json` that the forward pass depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct BloomConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub layer_norm_epsilon: f64,
    /// Residuals taken after the layer norms instead of before (false for every released BLOOM).
    pub apply_residual_connection_post_layernorm: bool,
    /// Dropout on the attention and MLP outputs, in training mode.
    pub hidden_dropout: f64,
    /// Dropout on the attention probabilities, in training mode.
    pub attention_dropout: f64,
    pub tie_word_embeddings: bool,
}

impl BloomConfig {
    /// Reads the fields with transformers' `BloomConfig` aliases (`n_embed`, `num_hidden_layers`,
    /// `num_attention_heads`) and defaults for the optional ones.
    pub(crate) fn from_fields(f: &Fields<'_>) -> Result<BloomConfig> {
        let config = BloomConfig {
            vocab_size: f.req_usize_any(&["vocab_size"])?,
            hidden_size: f.req_usize_any(&["hidden_size", "n_embed"])?,
            n_layer: f.req_usize_any(&["n_layer", "num_hidden_layers"])?,
            n_head: f.req_usize_any(&["n_head", "num_attention_heads"])?,
            layer_norm_epsilon: f.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
            apply_residual_connection_post_layernorm: f
                .opt_bool("apply_residual_connection_post_layernorm")?
                .unwrap_or(false),
            hidden_dropout: f.opt_probability("hidden_dropout")?.unwrap_or(0.0),
            attention_dropout: f.opt_probability("attention_dropout")?.unwrap_or(0.0),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        };
        // `describe()` sizes the MLP as 4 * hidden_size.
        if config.hidden_size.checked_mul(4).is_none() {
            return Err(f.error(format!("hidden_size {} is too large", config.hidden_size)));
        }
        if !config.hidden_size.is_multiple_of(config.n_head) {
            return Err(f.error(format!(
                "hidden_size {} is not a multiple of n_head {}",
                config.hidden_size, config.n_head
            )));
        }
        Ok(config)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.n_head
    }

    /// The ALiBi slope of each head, `[n_head]`, as transformers' `build_alibi_tensor`: with
    /// `p` the largest power of two `<= n_head`, heads `0..p` get `b^1, b^2, .., b^p` with
    /// `b = 2^(-8/p)`; the remaining heads get the odd powers `c^1, c^3, ..` of `c = 2^(-4/p)`
    /// (the slopes of `2p` heads, every other one). `b` and `c` are rounded to f32 before the
    /// powers, as torch does.
    pub fn alibi_slopes(&self) -> Vec<f32> {
        alibi_slopes(self.n_head)
    }

    pub fn describe(&self) -> BloomDescription {
        let h = self.hidden_size;
        let eps = self.layer_norm_epsilon;
        let layer_norm = |module: String| NormSpec::new(module, NormKind::LayerNorm, h, eps);
        let layers = (0..self.n_layer)
            .map(|i| {
                let prefix = format!("transformer.h.{i}");
                let attn = format!("{prefix}.self_attention");
                let mlp = format!("{prefix}.mlp");
                BloomLayer {
                    input_layernorm: layer_norm(format!("{prefix}.input_layernorm")),
                    query_key_value: LinearSpec::new(&attn, "query_key_value", h, 3 * h, true),
                    dense: LinearSpec::new(&attn, "dense", h, h, true),
                    post_attention_layernorm: layer_norm(format!(
                        "{prefix}.post_attention_layernorm"
                    )),
                    dense_h_to_4h: LinearSpec::new(&mlp, "dense_h_to_4h", h, 4 * h, true),
                    dense_4h_to_h: LinearSpec::new(&mlp, "dense_4h_to_h", 4 * h, h, true),
                }
            })
            .collect();
        BloomDescription {
            config: self.clone(),
            word_embeddings: EmbeddingSpec {
                name: "transformer.word_embeddings.weight".into(),
                vocab_size: self.vocab_size,
                hidden_size: h,
            },
            word_embeddings_layernorm: layer_norm("transformer.word_embeddings_layernorm".into()),
            layers,
            ln_f: layer_norm("transformer.ln_f".into()),
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

fn alibi_slopes(n_head: usize) -> Vec<f32> {
    // The largest power of two <= n_head, and its log2.
    let log2_p = usize::BITS - 1 - n_head.leading_zeros();
    let p = 1usize << log2_p;
    // 2^(-(2^-(log2(p) - 3))) = 2^(-8/p), computed in f64 as Python does, then stored as f32.
    let base_for = |log2: f64| 2f64.powf(-(2f64.powf(-(log2 - 3.0)))) as f32;
    let pow = |base: f32, k: usize| (f64::from(base).powi(k as i32)) as f32;
    let base = base_for(f64::from(log2_p));
    let mut slopes: Vec<f32> = (1..=p).map(|k| pow(base, k)).collect();
    if p != n_head {
        let extra_base = base_for(f64::from(log2_p + 1));
        let remaining = p.min(n_head - p);
        slopes.extend((0..remaining).map(|i| pow(extra_base, 2 * i + 1)));
    }
    slopes
}

/// The tensors of a BLOOM model.
#[derive(Debug, Clone, PartialEq)]
pub struct BloomDescription {
    pub config: BloomConfig,
    pub word_embeddings: EmbeddingSpec,
    pub word_embeddings_layernorm: NormSpec,
    pub layers: Vec<BloomLayer>,
    pub ln_f: NormSpec,
    pub lm_head: LmHead,
}

/// One BLOOM block.
#[derive(Debug, Clone, PartialEq)]
pub struct BloomLayer {
    pub input_layernorm: NormSpec,
    /// `[3H, H]`: output viewed as `[.., n_head, 3, head_dim]` (q, k, v per head).
    pub query_key_value: LinearSpec,
    pub dense: LinearSpec,
    pub post_attention_layernorm: NormSpec,
    pub dense_h_to_4h: LinearSpec,
    pub dense_4h_to_h: LinearSpec,
}

impl BloomLayer {
    pub fn linears(&self) -> [&LinearSpec; 4] {
        [
            &self.query_key_value,
            &self.dense,
            &self.dense_h_to_4h,
            &self.dense_4h_to_h,
        ]
    }
}

impl BloomDescription {
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut out = vec![self.word_embeddings.tensor(TensorRole::Embedding)];
        self.word_embeddings_layernorm.tensors(&mut out);
        for layer in &self.layers {
            layer.input_layernorm.tensors(&mut out);
            layer.query_key_value.tensors(&mut out);
            layer.dense.tensors(&mut out);
            layer.post_attention_layernorm.tensors(&mut out);
            layer.dense_h_to_4h.tensors(&mut out);
            layer.dense_4h_to_h.tensors(&mut out);
        }
        self.ln_f.tensors(&mut out);
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

    const TINY: &str = r#"{"model_type": "bloom", "vocab_size": 512, "hidden_size": 64,
        "n_layer": 2, "n_head": 4, "layer_norm_epsilon": 1e-5, "pad_token_id": 3}"#;

    #[test]
    fn parses_tiny_bloom_and_lists_its_tensors() {
        let config = ModelConfig::parse(TINY, "config.json").unwrap();
        let ArchConfig::Bloom(bloom) = &config.arch else {
            panic!("not bloom")
        };
        assert_eq!((bloom.n_head, bloom.head_dim()), (4, 16));
        assert!(bloom.tie_word_embeddings);
        assert_eq!(config.raw["pad_token_id"], 3);
        let description = config.describe();
        let tensors = description.tensors();
        // embedding + its LN (2) + 2 layers x (2 LN x 2 + 4 linears x 2) + ln_f (2)
        assert_eq!(tensors.len(), 1 + 2 + 2 * 12 + 2);
        let qkv = tensors
            .iter()
            .find(|t| t.name == "transformer.h.1.self_attention.query_key_value.weight")
            .unwrap();
        assert_eq!(
            (qkv.shape.clone(), qkv.role),
            (vec![192, 64], TensorRole::LinearWeight)
        );
        let linears = description.linears();
        assert_eq!(linears.len(), 8);
        assert_eq!(linears[3].module, "transformer.h.0.mlp.dense_4h_to_h");
        assert_eq!((linears[3].in_features, linears[3].out_features), (256, 64));
        let ArchDescription::Bloom(d) = description else {
            panic!()
        };
        assert_eq!(d.lm_head, LmHead::TiedToEmbedding);
    }

    #[test]
    fn alibi_slopes_match_transformers() {
        // Values of transformers' build_alibi_tensor (torch float32).
        assert_eq!(alibi_slopes(4), vec![0.25, 0.0625, 0.015625, 0.00390625]);
        let s8 = alibi_slopes(8);
        assert_eq!(s8[0], 0.5);
        assert_eq!(s8[7], 0.00390625);
        // 6 heads: the 4-head slopes, then the odd powers of the 8-head base 2^(-8/8) = 0.5.
        assert_eq!(
            alibi_slopes(6),
            vec![0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
        );
        // 12 heads: 8 powers of 0.5, then odd powers of 2^(-1/2).
        let s12 = alibi_slopes(12);
        assert_eq!(s12.len(), 12);
        let c = 2f64.powf(-0.5) as f32;
        assert_eq!(s12[8], c);
        assert_eq!(s12[9], (f64::from(c).powi(3)) as f32);
        assert!((s12[11] - 2f32.powf(-3.5)).abs() < 1e-7);
        // 32 heads (BLOOM-7b1): powers of 2^(-1/4).
        let s32 = alibi_slopes(32);
        assert!((s32[0] - 0.840_896_4).abs() < 1e-7);
        assert!((s32[31] / 0.003_906_25 - 1.0).abs() < 1e-5);
    }

    #[test]
    fn rejects_indivisible_heads() {
        let text = TINY.replace("\"n_head\": 4", "\"n_head\": 5");
        let err = ModelConfig::parse(&text, "config.json").unwrap_err();
        assert!(
            err.to_string().contains("not a multiple of n_head 5"),
            "{err}"
        );
    }

    #[test]
    fn missing_field_names_it() {
        let text = TINY.replace("\"vocab_size\": 512,", "");
        let err = ModelConfig::parse(&text, "m/config.json").unwrap_err();
        assert_eq!(err.to_string(), "m/config.json: missing `vocab_size`");
    }
}
