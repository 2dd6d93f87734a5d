//! What the training loop ([`super::train`]) needs of a model: the CPU model
//! ([`super::cpu::CpuTrainable`]) and the CUDA one ([`crate::cuda::CudaModel`]) both provide it.

use std::time::Duration;

use qlora_core::data::Batch;
use qlora_core::peft::{AdapterConfig, LoraAdapter};
use qlora_core::Result;
use rand_chacha::ChaCha12Rng;

use super::checkpoint::ParamSpec;
use super::collective::Collective;
use super::optimizer::{AdamW, AdamWParams};

/// A model whose LoRA matrices train with AdamW on micro-batches, a step's gradient being the
/// mean of its micro-batches'. Every per-parameter list (weights, AdamW moments) follows the
/// order of [`Trainable::parameters`].
pub trait Trainable {
    /// The trained matrices: A then B of each adapted module, in model order.
    fn parameters(&self) -> Vec<ParamSpec>;

    /// Starts an optimizer step: the gradients to zero.
    fn zero_grad(&mut self) -> Result<()>;

    /// The forward and backward pass of one of the step's `micro_batches` micro-batches (over
    /// all ranks), its dropout masks drawn from `dropout_rng`: returns its mean loss per target
    /// and adds its share (its gradient / `micro_batches`) to the step's gradient, which is the
    /// mean of the micro-batches' once all of them are in.
    fn accumulate_gradients(
        &mut self,
        batch: &Batch,
        micro_batches: usize,
        dropout_rng: &mut ChaCha12Rng,
    ) -> Result<f64>;

    /// Adds the other ranks' step gradients to this one's (data-parallel training: the sum of
    /// the ranks' shares is the step's mean gradient); returns how long that took.
    fn all_reduce_gradients(&mut self, ranks: &dyn Collective) -> Result<Duration>;

    /// The global L2 norm of the step's gradient, which is then clipped to `max_norm` as
    /// `torch.nn.utils.clip_grad_norm_` does (`max_norm <= 0`: no clipping).
    fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64>;

    /// One AdamW update with the step's gradient at learning rate `lr`.
    fn optimizer_step(&mut self, params: AdamWParams, lr: f64) -> Result<()>;

    /// Whether every trained value is finite.
    fn weights_finite(&self) -> Result<bool>;

    /// The mean loss per target of `batch` (which has at least one), without dropout.
    fn eval_loss(&self, batch: &Batch) -> Result<f64>;

    /// The trained matrices as an f32 PEFT adapter.
    fn adapter(&self, config: &AdapterConfig) -> Result<LoraAdapter>;

    /// AdamW's step count and moments.
    fn optimizer_state(&self) -> Result<AdamW>;

    /// Sets the trained matrices and AdamW's state to a checkpoint's, both in the order and
    /// lengths of [`Trainable::parameters`].
    fn restore(&mut self, weights: Vec<Vec<f32>>, optimizer: AdamW) -> Result<()>;
}
