//! A CPU [`Model`] as the training loop sees it: f32 copies of its LoRA matrices that AdamW
//! updates on the host (and copies back into the model's Vars), the summed gradients of the
//! step's micro-batches, and AdamW's state.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, Var};
use qlora_core::data::Batch;
use qlora_core::peft::{AdapterConfig, LoraAdapter};
use qlora_core::{Error, Result};
use rand_chacha::ChaCha12Rng;

use super::adapter::model_adapter;
use super::batches::BatchTensors;
use super::checkpoint::ParamSpec;
use super::collective::Collective;
use super::optimizer::{clip_grad_norm, AdamW, AdamWParams};
use super::trainable::Trainable;
use crate::cpu::{backward, causal_lm_loss, compute_error, Mode, Model};

/// The LoRA matrices of a CPU model under training.
pub struct CpuTrainable<'m> {
    model: &'m Model,
    /// The model's A and B Vars of each adapter, in [`Trainable::parameters`] order.
    vars: Vec<&'m Var>,
    specs: Vec<ParamSpec>,
    /// f32 copies of the Vars' values, which the optimizer updates.
    values: Vec<Vec<f32>>,
    /// The step's micro-batch gradients, each divided by the step's micro-batch count, summed.
    grads: Vec<Vec<f32>>,
    optimizer: AdamW,
}

impl<'m> CpuTrainable<'m> {
    /// Training state for `model`'s adapters as they are now, AdamW's moments at zero.
    pub fn new(model: &'m Model) -> Result<CpuTrainable<'m>> {
        let adapters = model.lora_adapters();
        let mut specs = Vec::new();
        for adapter in &adapters {
            let (r, in_features) = adapter.a.as_tensor().dims2().map_err(compute_error)?;
            let (out_features, _) = adapter.b.as_tensor().dims2().map_err(compute_error)?;
            specs.extend(ParamSpec::lora_pair(
                &adapter.module,
                r,
                in_features,
                out_features,
            ));
        }
        let vars: Vec<&Var> = adapters.into_iter().flat_map(|a| [&a.a, &a.b]).collect();
        let values: Vec<Vec<f32>> = vars
            .iter()
            .map(|v| flat(v.as_tensor()))
            .collect::<Result<_>>()?;
        let lengths: Vec<usize> = values.iter().map(Vec::len).collect();
        Ok(CpuTrainable {
            model,
            vars,
            specs,
            grads: lengths.iter().map(|&n| vec![0.0; n]).collect(),
            optimizer: AdamW::new(&lengths),
            values,
        })
    }

    /// Copies the values into the model.
    fn store(&self) -> Result<()> {
        for (var, values) in self.vars.iter().zip(&self.values) {
            let t = Tensor::from_slice(values, var.as_tensor().dims(), &Device::Cpu);
            t.and_then(|t| var.set(&t)).map_err(compute_error)?;
        }
        Ok(())
    }
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(compute_error)
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_scalar::<f32>().map(f64::from).map_err(compute_error)
}

impl Trainable for CpuTrainable<'_> {
    fn parameters(&self) -> Vec<ParamSpec> {
        self.specs.clone()
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.grads.iter_mut().for_each(|g| g.fill(0.0));
        Ok(())
    }

    fn accumulate_gradients(
        &mut self,
        batch: &Batch,
        micro_batches: usize,
        dropout_rng: &mut ChaCha12Rng,
    ) -> Result<f64> {
        let tensors = BatchTensors::new(batch)?;
        let logits = self.model.forward(
            &tensors.input_ids,
            Some(&tensors.attention_mask),
            &mut Mode::Train(dropout_rng),
        )?;
        let loss = causal_lm_loss(&logits, &tensors.labels)?;
        let grads = backward(&loss)?;
        let pairs = self.model.lora_gradients(&grads)?;
        let micro = micro_batches as f32;
        for (sum, grad) in self
            .grads
            .iter_mut()
            .zip(pairs.iter().flat_map(|g| [&g.a, &g.b]))
        {
            sum.iter_mut()
                .zip(flat(grad)?)
                .for_each(|(s, g)| *s += g / micro);
        }
        scalar(&loss)
    }

    fn all_reduce_gradients(&mut self, ranks: &dyn Collective) -> Result<Duration> {
        let started = Instant::now();
        let mut all: Vec<f64> = self.grads.iter().flatten().map(|&g| f64::from(g)).collect();
        ranks.sum(&mut all)?;
        let mut summed = all.into_iter();
        for g in self.grads.iter_mut().flatten() {
            *g = summed.next().expect("as many sums as gradients") as f32;
        }
        Ok(started.elapsed())
    }

    fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        Ok(clip_grad_norm(&mut self.grads, max_norm))
    }

    fn optimizer_step(&mut self, params: AdamWParams, lr: f64) -> Result<()> {
        self.optimizer
            .step(params, &mut self.values, &self.grads, lr);
        self.store()
    }

    fn weights_finite(&self) -> Result<bool> {
        Ok(self.values.iter().flatten().all(|x| x.is_finite()))
    }

    fn eval_loss(&self, batch: &Batch) -> Result<f64> {
        let tensors = BatchTensors::new(batch)?;
        let logits = self.model.forward(
            &tensors.input_ids,
            Some(&tensors.attention_mask),
            &mut Mode::Eval,
        )?;
        scalar(&causal_lm_loss(&logits, &tensors.labels)?)
    }

    fn adapter(&self, config: &AdapterConfig) -> Result<LoraAdapter> {
        model_adapter(self.model, config)
    }

    fn optimizer_state(&self) -> Result<AdamW> {
        Ok(self.optimizer.clone())
    }

    fn restore(&mut self, weights: Vec<Vec<f32>>, optimizer: AdamW) -> Result<()> {
        let lengths: Vec<usize> = self.values.iter().map(Vec::len).collect();
        if !weights.iter().map(Vec::len).eq(lengths.iter().copied()) || !optimizer.fits(&lengths) {
            return Err(Error::Invalid(
                "the restored weights or optimizer state do not fit the model's adapters".into(),
            ));
        }
        self.values = weights;
        self.optimizer = optimizer;
        self.store()
    }
}
