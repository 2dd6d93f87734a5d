//! The CUDA model in the training loop ([`crate::train::train`]): its LoRA masters, gradients
//! and AdamW moments stay on the GPU; checkpoints read them back and a resumed run writes them
//! there again. The dropout masks of a micro-batch come from a seed drawn from the loop's
//! dropout generator (hashed with each projection's id and element index on the GPU), so the
//! generator's saved position restores them.

use std::time::Duration;

use qlora_core::data::Batch;
use qlora_core::peft::{AdapterConfig, LoraAdapter};
use qlora_core::Result;
use rand::Rng;
use rand_chacha::ChaCha12Rng;

use super::batch::GpuBatch;
use super::model::CudaModel;
use crate::train::adapter::adapter_from_pairs;
use crate::train::checkpoint::ParamSpec;
use crate::train::collective::Collective;
use crate::train::optimizer::{AdamW, AdamWParams};
use crate::train::Trainable;

impl Trainable for CudaModel {
    fn parameters(&self) -> Vec<ParamSpec> {
        self.lora_parameters()
    }

    fn zero_grad(&mut self) -> Result<()> {
        CudaModel::zero_grad(self)
    }

    fn accumulate_gradients(
        &mut self,
        batch: &Batch,
        micro_batches: usize,
        dropout_rng: &mut ChaCha12Rng,
    ) -> Result<f64> {
        let gpu_batch = GpuBatch::upload(self.gpu(), batch, self.vocab_size())?;
        let seed: u64 = dropout_rng.random();
        self.forward_backward(&gpu_batch, 1.0 / micro_batches as f32, seed)
    }

    fn all_reduce_gradients(&mut self, ranks: &dyn Collective) -> Result<Duration> {
        // The LoRA gradients are one flat f32 buffer: one all-reduce.
        let (ptr, len) = self.gradient_buffer();
        ranks.sum_device_f32(ptr, len)
    }

    fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        CudaModel::clip_grad_norm(self, max_norm)
    }

    fn optimizer_step(&mut self, params: AdamWParams, lr: f64) -> Result<()> {
        self.adamw_step(params, lr)?;
        // The step's time (tokens/s) includes its queued kernels.
        self.gpu().sync()
    }

    fn weights_finite(&self) -> Result<bool> {
        self.lora_finite()
    }

    fn eval_loss(&self, batch: &Batch) -> Result<f64> {
        self.loss(&GpuBatch::upload(self.gpu(), batch, self.vocab_size())?)
    }

    fn adapter(&self, config: &AdapterConfig) -> Result<LoraAdapter> {
        Ok(adapter_from_pairs(self.lora_pairs()?, config))
    }

    fn optimizer_state(&self) -> Result<AdamW> {
        self.adamw_state()
    }

    fn restore(&mut self, weights: Vec<Vec<f32>>, optimizer: AdamW) -> Result<()> {
        self.restore_lora(&weights, &optimizer)
    }
}
