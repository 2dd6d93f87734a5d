//! What a model will take on the device, from its config alone: checked against the granted
//! limits before any tensor is read, so that a model that cannot fit fails at once with what it
//! needs and what the device grants.

use std::collections::BTreeMap;

use qlora_core::arch::{LmHead, ModelConfig, TensorRole};
use qlora_core::checkpoint::{StoredNames, TensorSource};
use qlora_core::{DType, Result};

use super::{lm_head_of, Footprint, LoadOptions};
use crate::buffers::{check_fits, padded, rows_per_buffer, Dense};
use crate::device::Engine;

/// bitsandbytes' bytes for `numel` 4-bit values in blocks of `blocksize`: packed codes, then an
/// f32 absmax per block, or a u8 code per block and an f32 per 256 blocks; padded as every
/// buffer is.
fn four_bit_bytes(numel: usize, blocksize: usize, double_quant: bool) -> usize {
    let blocks = numel.div_ceil(blocksize);
    let absmax = if double_quant {
        blocks.div_ceil(4) * 4 + blocks.div_ceil(256) * 4
    } else {
        blocks * 4
    };
    padded(numel.div_ceil(8) * 4 + absmax)
}

impl Engine {
    /// The model's footprint as [`Engine::load`] will lay it out from `weights` (their names,
    /// shapes and dtypes only; 4-bit linear weights of a stored 4-bit checkpoint counted with
    /// HF's blocks of 64; of the activations only the two largest, the attention scores and the
    /// logits), or an error naming the first buffer that exceeds the device's binding limit.
    pub fn plan(
        &self,
        config: &ModelConfig,
        weights: &dyn TensorSource,
        options: &LoadOptions,
    ) -> Result<Footprint> {
        let dtypes: BTreeMap<String, DType> = weights
            .tensor_infos()
            .into_iter()
            .map(|i| (i.name, i.dtype))
            .collect();
        let description = config.describe();
        let names = StoredNames::of(weights, &description);
        let dtype_of = |name: &str| {
            dtypes
                .get(names.stored(name))
                .copied()
                .unwrap_or(DType::F32)
        };
        let four_bit = match (&config.quantization, options.quantize) {
            (Some(q), _) => Some((64, q.use_double_quant)),
            (None, Some(q)) => Some((q.blocksize, q.double_quant)),
            (None, None) => None,
        };
        let tied = lm_head_of(&description) == &LmHead::TiedToEmbedding;
        let mut footprint = Footprint::default();
        for tensor in description.tensors() {
            let numel: usize = tensor.shape.iter().product();
            let bytes = match (tensor.role, four_bit) {
                (TensorRole::LinearWeight, Some((blocksize, dq))) => {
                    let bytes = four_bit_bytes(numel, blocksize, dq);
                    check_fits(self, &tensor.name, bytes as u64)?;
                    bytes
                }
                (TensorRole::Embedding | TensorRole::LmHead | TensorRole::LinearWeight, _) => {
                    // Kept in the checkpoint's dtype (an f32 LM head as bf16 on request), split
                    // by rows where needed.
                    let is_head = tensor.role == TensorRole::LmHead
                        || (tensor.role == TensorRole::Embedding && tied);
                    let size = match Dense::of(dtype_of(&tensor.name)) {
                        Dense::F32 if is_head && options.bf16_lm_head => Dense::Bf16.size(),
                        dtype => dtype.size(),
                    };
                    let rows = tensor.shape[0];
                    // At most `rows`: the products below stay within wasm32's usize.
                    let per_part =
                        rows_per_buffer(self, &tensor.name, numel / rows, size)?.clamp(1, rows);
                    let parts = rows.div_ceil(per_part);
                    if parts > 1 {
                        footprint.split_tensors.push((tensor.name.clone(), parts));
                    }
                    let part_bytes = |n: usize| padded(n * (numel / rows) * size);
                    (parts - 1) * part_bytes(per_part) + part_bytes(rows - (parts - 1) * per_part)
                }
                // Norms and biases: f32.
                _ => padded(numel * 4),
            };
            footprint.weight_bytes += bytes as u64;
        }
        let (heads, kv_width) = match &config.arch {
            qlora_core::arch::ArchConfig::Bloom(c) => (c.n_head, c.hidden_size),
            qlora_core::arch::ArchConfig::Llama(c) => {
                (c.num_attention_heads, c.num_key_value_heads * c.head_dim)
            }
        };
        let cache_bytes = options.max_seq_len * kv_width * 4;
        check_fits(self, "a layer's key cache", cache_bytes as u64)?;
        footprint.cache_bytes = (2 * config.num_layers() * cache_bytes) as u64;
        let scores = options.chunk * heads * options.max_seq_len * 4;
        check_fits(self, "the attention scores", scores as u64)?;
        let logits = options.chunk * config.vocab_size() * 4;
        check_fits(self, "the logits", logits as u64)?;
        footprint.activation_bytes = (scores + logits) as u64;
        Ok(footprint)
    }
}
