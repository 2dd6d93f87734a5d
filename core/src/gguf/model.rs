//! A LLaMA-family GGUF model seen as an HF checkpoint: a `config.json` made from its metadata,
//! and its tensors under transformers' names, dequantized to f32.
//!
//! llama.cpp's converter permutes the rows of `q_proj`/`k_proj` so that RoPE rotates adjacent
//! pairs (its NORM mode) instead of transformers' two halves. The permutation is undone here, so
//! the model runs with transformers' RoPE and a LoRA adapter trained on it has the row order of
//! the HF model: PEFT can load it onto the original checkpoint.

use serde_json::json;

use super::Gguf;
use crate::arch::ModelConfig;
use crate::checkpoint::{RawTensor, TensorInfo, TensorSource};
use crate::{DType, Error, Result};

/// The transformers name of a GGUF tensor name, for the LLaMA layout.
fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{suffix}"))
}

/// A GGUF file as a [`TensorSource`] with transformers' names, plus the [`ModelConfig`] its
/// metadata describes.
pub struct GgufCheckpoint {
    gguf: Gguf,
    config: ModelConfig,
    /// (HF name, GGUF name), sorted by HF name.
    names: Vec<(String, String)>,
    n_head: usize,
    n_head_kv: usize,
}

impl GgufCheckpoint {
    pub fn new(gguf: Gguf) -> Result<Self> {
        let file = gguf.name().to_string();
        let arch = gguf
            .require("general.architecture", Gguf::get_str)?
            .to_string();
        if arch != "llama" {
            return Err(Error::format(
                &file,
                format!("general.architecture `{arch}` is not supported (only llama)"),
            ));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let usize_of =
            |k: &str| -> Result<usize> { Ok(gguf.require(&key(k), Gguf::get_u64)? as usize) };
        let hidden = usize_of("embedding_length")?;
        let n_head = usize_of("attention.head_count")?;
        let n_head_kv = match gguf.get_u64(&key("attention.head_count_kv"))? {
            Some(n) => n as usize,
            None => n_head,
        };
        let vocab = match gguf.get_u64(&key("vocab_size"))? {
            Some(n) => n as usize,
            None => gguf
                .get_str_array("tokenizer.ggml.tokens")?
                .map(|t| t.len())
                .ok_or_else(|| Error::format(&file, "no vocab_size and no token list"))?,
        };
        let tied = gguf.tensor("output.weight").is_none();
        let mut config = json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": hidden,
            "intermediate_size": usize_of("feed_forward_length")?,
            "num_hidden_layers": usize_of("block_count")?,
            "num_attention_heads": n_head,
            "num_key_value_heads": n_head_kv,
            "vocab_size": vocab,
            "max_position_embeddings": usize_of("context_length")?,
            "rms_norm_eps": gguf.require(&key("attention.layer_norm_rms_epsilon"), Gguf::get_f64)?,
            "rope_theta": gguf.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
            "tie_word_embeddings": tied,
            "hidden_act": "silu",
            "attention_bias": false,
        });
        for (gguf_key, hf_key) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = gguf.get_u64(gguf_key)? {
                config[hf_key] = json!(id);
            }
        }
        let config = ModelConfig::parse(&config.to_string(), &file)?;
        let mut names = Vec::new();
        for t in gguf.tensors() {
            let hf = hf_name(&t.name)
                .ok_or_else(|| Error::tensor(&file, &t.name, "not a tensor of a llama model"))?;
            names.push((hf, t.name.clone()));
        }
        names.sort();
        Ok(GgufCheckpoint {
            gguf,
            config,
            names,
            n_head,
            n_head_kv,
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path) -> Result<Self> {
        GgufCheckpoint::new(Gguf::open(path)?)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn gguf(&self) -> &Gguf {
        &self.gguf
    }

    fn gguf_name(&self, hf: &str) -> Option<&str> {
        self.names
            .binary_search_by(|(n, _)| n.as_str().cmp(hf))
            .ok()
            .map(|i| self.names[i].1.as_str())
    }
}

/// Undoes llama.cpp's `permute(w, n_head)` of a `[n_head * head_dim, cols]` matrix: its rows
/// were reordered from `(head, half, i)` to `(head, i, half)`.
fn unpermute_rows(w: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for p in 0..2 {
                let gguf_row = h * 2 * half + i * 2 + p;
                let hf_row = h * 2 * half + p * half + i;
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&w[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    out
}

impl TensorSource for GgufCheckpoint {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.names
            .iter()
            .map(|(hf, g)| TensorInfo {
                name: hf.clone(),
                dtype: DType::F32,
                shape: self
                    .gguf
                    .tensor(g)
                    .map(|t| t.shape().iter().map(|&d| d as usize).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }

    fn read(&self, name: &str) -> Result<RawTensor> {
        let g = self
            .gguf_name(name)
            .ok_or_else(|| Error::tensor(self.gguf.name(), name, "no such tensor"))?;
        let info = self
            .gguf
            .tensor(g)
            .expect("names come from the tensor list");
        let shape: Vec<usize> = info.shape().iter().map(|&d| d as usize).collect();
        let mut values = self.gguf.tensor_f32(g)?;
        let heads = if name.ends_with("self_attn.q_proj.weight") {
            Some(self.n_head)
        } else if name.ends_with("self_attn.k_proj.weight") {
            Some(self.n_head_kv)
        } else {
            None
        };
        if let Some(n_head) = heads {
            if shape.len() != 2 || !shape[0].is_multiple_of(2 * n_head) {
                return Err(Error::tensor(
                    self.gguf.name(),
                    g,
                    format!("shape {shape:?} does not split into {n_head} heads"),
                ));
            }
            values = unpermute_rows(&values, n_head, shape[0], shape[1]);
        }
        Ok(RawTensor {
            dtype: DType::F32,
            shape,
            data: crate::dtype::from_f32(DType::F32, &values),
        })
    }

    fn file_of(&self, name: &str) -> Option<String> {
        self.gguf_name(name).map(|_| self.gguf.name().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_transformers() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, rows, cols) = (2, 8, 3);
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let half = rows / n_head / 2;
        let mut permuted = vec![0.0; hf.len()];
        for h in 0..n_head {
            for p in 0..2 {
                for i in 0..half {
                    let src = h * 2 * half + p * half + i;
                    let dst = h * 2 * half + i * 2 + p;
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(permuted, hf);
        assert_eq!(unpermute_rows(&permuted, n_head, rows, cols), hf);
    }
}
