//! The CPU reference path: BLOOM and LLaMA-family forward passes with LoRA, the causal-LM loss and
//! its backward, on candle-core in f32. Plain and exact rather than fast: the CUDA and WGSL paths
//! are tested against it, and every step follows the transformers / PEFT code it mirrors.
//!
//! Use:
//! ```text
//! let model = Model::load(&config, &checkpoint, Some(&LoraSetup { config: lora, init }))?;
//! let logits = model.forward(&input_ids, Some(&attention_mask), &mut Mode::Train(&mut rng))?;
//! let loss = causal_lm_loss(&logits, &labels)?;
//! let grads = backward(&loss)?;
//! for g in model.lora_gradients(&grads)? { /* g.module, g.a [r, in], g.b [out, r] */ }
//! ```
//!
//! Frozen base weights are plain f32 tensors (a 4-bit checkpoint is dequantized by its
//! [`TensorSource`]); only the LoRA matrices are candle [`Var`](candle_core::Var)s, so the
//! backward pass computes no gradient for the base model.

pub mod bloom;
pub mod kv_cache;
pub mod llama;
pub mod lora;
mod loss;
mod ops;
pub(crate) mod weights;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use qlora_core::arch::{ArchConfig, ModelConfig};
use qlora_core::checkpoint::TensorSource;
use qlora_core::{Error, Result};
use rand::RngCore;

pub use kv_cache::KvCache;
pub use lora::{LoraAdapter, LoraInit, LoraSetup};
pub use loss::causal_lm_loss;

/// Evaluation (no dropout), inference or a training step, whose dropout masks come from the
/// given RNG.
pub enum Mode<'r> {
    /// No dropout; the LoRA matrices stay in the autograd graph, so a loss computed in this mode
    /// can still be back-propagated (the golden gradients are taken without dropout).
    Eval,
    /// No dropout and no autograd graph: the LoRA matrices enter as detached tensors, so every
    /// intermediate activation is freed as soon as the forward pass moves on. Generation and
    /// any logits nobody differentiates.
    Inference,
    Train(&'r mut dyn RngCore),
}

/// A candle failure as a library error. Shapes are checked before computing, so this reports a
/// bug or an allocation failure, not bad input.
pub(crate) fn compute_error(e: candle_core::Error) -> Error {
    Error::Invalid(format!("CPU computation failed: {e}"))
}

/// A causal language model on the CPU.
pub enum Model {
    Bloom(bloom::Bloom),
    /// `llama` and `qwen2`.
    Llama(llama::Llama),
}

/// The gradients of one LoRA adapter's matrices.
pub struct LoraGradient<'m> {
    /// The adapted module's path (`transformer.h.0.self_attention.query_key_value`).
    pub module: &'m str,
    /// `dL/dA`, `[r, in_features]`.
    pub a: Tensor,
    /// `dL/dB`, `[out_features, r]`.
    pub b: Tensor,
}

impl Model {
    /// Builds the model of `config` from the tensors of `checkpoint` (names and shapes as
    /// [`ModelConfig::describe`] lists them), with LoRA adapters when `lora` is given.
    pub fn load(
        config: &ModelConfig,
        checkpoint: &dyn TensorSource,
        lora: Option<&LoraSetup<'_>>,
    ) -> Result<Model> {
        let description = config.describe();
        let mut adapters = lora
            .map(|setup| lora::AdapterFactory::new(setup, &description))
            .transpose()?;
        let weights = weights::Weights::new(checkpoint, &description);
        Ok(match &config.arch {
            ArchConfig::Bloom(c) => {
                Model::Bloom(bloom::Bloom::load(c, &weights, adapters.as_mut())?)
            }
            ArchConfig::Llama(c) => {
                Model::Llama(llama::Llama::load(c, &weights, adapters.as_mut())?)
            }
        })
    }

    /// Logits `[B, T, vocab]` (f32) for `input_ids` `[B, T]` (u32 or i64 token ids).
    /// `attention_mask` `[B, T]` marks real tokens with 1 and padding with 0 (any numeric dtype);
    /// `None` means no padding.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let batch = ops::Batch::new(input_ids, attention_mask, self.vocab_size())?;
        match self {
            Model::Bloom(m) => m.forward(&batch, mode),
            Model::Llama(m) => m.forward(&batch, mode),
        }
        .map_err(compute_error)
    }

    /// An empty KV cache for [`Model::forward_cached`].
    pub fn kv_cache(&self) -> KvCache {
        KvCache::new(match self {
            Model::Bloom(m) => m.num_layers(),
            Model::Llama(m) => m.num_layers(),
        })
    }

    /// Incremental evaluation: logits `[B, T, vocab]` of `input_ids` `[B, T]`, the tokens that
    /// follow those already in `cache` (which then holds them too). `attention_mask` `[B, T]`
    /// marks this step's padding, as in [`Model::forward`]; positions count each row's real
    /// tokens, so a left- or right-padded row gives the logits it would give alone. Feeding a
    /// sequence in pieces gives the logits of one [`Model::forward`] over it.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let batch = ops::Batch::new(input_ids, attention_mask, self.vocab_size())?;
        let step = cache.begin_step(&batch)?;
        match self {
            Model::Bloom(m) => m.forward_cached(&batch, &step, cache.layers_mut()),
            Model::Llama(m) => m.forward_cached(&batch, &step, cache.layers_mut()),
        }
        .map(|logits| logits.detach())
        .map_err(compute_error)
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Model::Bloom(m) => m.config().vocab_size,
            Model::Llama(m) => m.config().vocab_size,
        }
    }

    /// Every LoRA adapter, in model order.
    pub fn lora_adapters(&self) -> Vec<&LoraAdapter> {
        match self {
            Model::Bloom(m) => m.lora_adapters(),
            Model::Llama(m) => m.lora_adapters(),
        }
    }

    /// The gradients of every LoRA matrix from a backward pass of a loss of this model.
    pub fn lora_gradients(&self, grads: &GradStore) -> Result<Vec<LoraGradient<'_>>> {
        self.lora_adapters()
            .into_iter()
            .map(|adapter| {
                let grad = |var: &candle_core::Var, which: &str| {
                    grads.get(var.as_tensor()).cloned().ok_or_else(|| {
                        Error::Invalid(format!(
                            "no gradient for LoRA {which} of {}: the loss does not depend on it",
                            adapter.module
                        ))
                    })
                };
                Ok(LoraGradient {
                    module: &adapter.module,
                    a: grad(&adapter.a, "A")?,
                    b: grad(&adapter.b, "B")?,
                })
            })
            .collect()
    }
}

/// Back-propagates a scalar loss: the gradients of every LoRA [`Var`](candle_core::Var) it
/// depends on (read them with [`Model::lora_gradients`]).
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    loss.backward().map_err(compute_error)
}
