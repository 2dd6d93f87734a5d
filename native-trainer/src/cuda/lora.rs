//! The LoRA parameters of a model in flat GPU buffers: fp32 master weights, their copy in the
//! activation precision for the GEMMs, fp32 gradients and AdamW moments. Adapter `i` owns the
//! ranges `a` (`[r, in]`) and `b` (`[out, r]`) of every buffer.

use qlora_core::peft::LoraPair;
use qlora_core::{Error, Result};
use qlora_kernels::{AdamWCoefficients, DeviceBuffer, Gpu, Kernels, Precision};

use crate::train::checkpoint::ParamSpec;
use crate::train::optimizer::{AdamW, AdamWParams};

/// The gradients of one adapter's matrices.
pub struct LoraGradients {
    /// The adapted module's path.
    pub module: String,
    /// `dL/dA`, `[r, in_features]`.
    pub a: Vec<f32>,
    /// `dL/dB`, `[out_features, r]`.
    pub b: Vec<f32>,
}

pub(crate) struct Slot {
    pub module: String,
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
    pub dropout: f32,
    /// Element offsets of A and B in the flat buffers.
    pub a: usize,
    pub b: usize,
}

pub(crate) struct LoraStore {
    pub slots: Vec<Slot>,
    pub len: usize,
    pub master: DeviceBuffer,
    pub compute: DeviceBuffer,
    pub grad: DeviceBuffer,
    first_moment: DeviceBuffer,
    second_moment: DeviceBuffer,
    precision: Precision,
    steps: u64,
}

/// One adapter's initial values, as the CPU path draws or reads them.
pub(crate) struct InitialAdapter {
    pub module: String,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
    pub dropout: f32,
}

impl LoraStore {
    pub(crate) fn new(
        gpu: &Gpu,
        kernels: &Kernels,
        adapters: Vec<InitialAdapter>,
    ) -> Result<LoraStore> {
        let mut host = Vec::new();
        let mut slots = Vec::new();
        for ad in adapters {
            let a = host.len();
            host.extend_from_slice(&ad.a);
            let b = host.len();
            host.extend_from_slice(&ad.b);
            slots.push(Slot {
                module: ad.module,
                r: ad.r,
                in_features: ad.in_features,
                out_features: ad.out_features,
                scale: ad.scale,
                dropout: ad.dropout,
                a,
                b,
            });
        }
        let len = host.len();
        let precision = kernels.precision;
        let master = gpu.upload(&host, "LoRA weights")?;
        let compute = gpu.alloc(precision.size() * len.max(1), "LoRA weights (compute copy)")?;
        if len > 0 {
            kernels.cast_from_f32(master.ptr(), compute.ptr(), len)?;
        }
        Ok(LoraStore {
            slots,
            len,
            master,
            compute,
            grad: gpu.zeros(4 * len.max(1), "LoRA gradients")?,
            first_moment: gpu.zeros(4 * len.max(1), "AdamW state")?,
            second_moment: gpu.zeros(4 * len.max(1), "AdamW state")?,
            precision,
            steps: 0,
        })
    }

    /// Compute-precision A and B of slot `i`.
    pub(crate) fn a(&self, i: usize) -> u64 {
        self.compute.at(self.slots[i].a * self.precision.size())
    }
    pub(crate) fn b(&self, i: usize) -> u64 {
        self.compute.at(self.slots[i].b * self.precision.size())
    }
    /// fp32 gradients of A and B of slot `i`.
    pub(crate) fn grad_a(&self, i: usize) -> u64 {
        self.grad.at(self.slots[i].a * 4)
    }
    pub(crate) fn grad_b(&self, i: usize) -> u64 {
        self.grad.at(self.slots[i].b * 4)
    }

    pub(crate) fn zero_grad(&self, gpu: &Gpu) -> Result<()> {
        gpu.memset_zero(self.grad.ptr(), 4 * self.len)
    }

    /// Global L2 norm of the gradients, and clipping to `max_norm` as
    /// `torch.nn.utils.clip_grad_norm_` (no clipping when `max_norm <= 0`).
    pub(crate) fn clip_grad_norm(
        &self,
        gpu: &Gpu,
        kernels: &Kernels,
        max_norm: f64,
    ) -> Result<f64> {
        let total = gpu.zeros(8, "gradient norm")?;
        kernels.sum_squares(self.grad.ptr(), self.len, total.ptr())?;
        let norm = gpu.read::<f64>(total.ptr(), 1)?[0].sqrt();
        if max_norm > 0.0 {
            let factor = (max_norm / (norm + 1e-6)).min(1.0);
            if factor < 1.0 {
                kernels.scale_f32(self.grad.ptr(), factor as f32, self.len)?;
            }
        }
        Ok(norm)
    }

    /// One AdamW step at learning rate `lr`, coefficients as train/optimizer.rs computes them.
    pub(crate) fn adamw_step(
        &mut self,
        kernels: &Kernels,
        params: AdamWParams,
        lr: f64,
    ) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let c = AdamWCoefficients {
            decay: (1.0 - lr * params.weight_decay) as f32,
            one_minus_beta1: (1.0 - params.beta1) as f32,
            beta2: params.beta2 as f32,
            one_minus_beta2: (1.0 - params.beta2) as f32,
            step_size: (lr / (1.0 - params.beta1.powi(t))) as f32,
            bias_correction2_sqrt: (1.0 - params.beta2.powi(t)).sqrt() as f32,
            eps: params.eps as f32,
        };
        kernels.adamw(
            self.master.ptr(),
            self.grad.ptr(),
            self.first_moment.ptr(),
            self.second_moment.ptr(),
            self.compute.ptr(),
            self.len,
            &c,
        )
    }

    /// The fp32 master values of every adapter, for saving.
    pub(crate) fn pairs(&self, gpu: &Gpu) -> Result<Vec<(String, LoraPair)>> {
        let all = gpu.read::<f32>(self.master.ptr(), self.len)?;
        Ok(self
            .slots
            .iter()
            .map(|s| {
                let a = all[s.a..s.a + s.r * s.in_features].to_vec();
                let b = all[s.b..s.b + s.out_features * s.r].to_vec();
                (
                    s.module.clone(),
                    LoraPair {
                        a,
                        b,
                        r: s.r,
                        in_features: s.in_features,
                        out_features: s.out_features,
                    },
                )
            })
            .collect())
    }

    /// The fp32 gradients of every adapter.
    pub(crate) fn gradients(&self, gpu: &Gpu) -> Result<Vec<LoraGradients>> {
        let all = gpu.read::<f32>(self.grad.ptr(), self.len)?;
        Ok(self
            .slots
            .iter()
            .map(|s| LoraGradients {
                module: s.module.clone(),
                a: all[s.a..s.a + s.r * s.in_features].to_vec(),
                b: all[s.b..s.b + s.out_features * s.r].to_vec(),
            })
            .collect())
    }

    /// The parameters in buffer order: A then B of each slot.
    pub(crate) fn param_specs(&self) -> Vec<ParamSpec> {
        self.slots
            .iter()
            .flat_map(|s| ParamSpec::lora_pair(&s.module, s.r, s.in_features, s.out_features))
            .collect()
    }

    /// A flat buffer's values cut into the parameters of [`LoraStore::param_specs`] (the
    /// buffers hold each slot's A and then its B, slot after slot, with no gap).
    fn split(&self, all: &[f32]) -> Vec<Vec<f32>> {
        let mut rest = all;
        self.param_specs()
            .iter()
            .map(|spec| {
                let (head, tail) = rest.split_at(spec.elements());
                rest = tail;
                head.to_vec()
            })
            .collect()
    }

    /// AdamW's step count and moments.
    pub(crate) fn optimizer_state(&self, gpu: &Gpu) -> Result<AdamW> {
        let first = self.split(&gpu.read::<f32>(self.first_moment.ptr(), self.len)?);
        let second = self.split(&gpu.read::<f32>(self.second_moment.ptr(), self.len)?);
        let lengths: Vec<usize> = first.iter().map(Vec::len).collect();
        Ok(AdamW::from_state(&lengths, self.steps, first, second)
            .expect("both moments are cut to the same lengths"))
    }

    /// Sets the fp32 master weights (and their compute copy), AdamW's moments and step count
    /// to saved ones, per parameter in [`LoraStore::param_specs`] order.
    pub(crate) fn restore(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        weights: &[Vec<f32>],
        optimizer: &AdamW,
    ) -> Result<()> {
        let lengths: Vec<usize> = self.param_specs().iter().map(ParamSpec::elements).collect();
        if !weights.iter().map(Vec::len).eq(lengths.iter().copied()) || !optimizer.fits(&lengths) {
            return Err(Error::Invalid(
                "the restored weights or optimizer state do not fit the model's adapters".into(),
            ));
        }
        if self.len > 0 {
            gpu.write(self.master.ptr(), &weights.concat())?;
            kernels.cast_from_f32(self.master.ptr(), self.compute.ptr(), self.len)?;
            gpu.write(self.first_moment.ptr(), &optimizer.first_moments().concat())?;
            gpu.write(
                self.second_moment.ptr(),
                &optimizer.second_moments().concat(),
            )?;
        }
        self.steps = optimizer.steps();
        Ok(())
    }

    /// Whether every fp32 master weight is finite: their sum of squares (in f64, which no
    /// finite f32 square overflows) is.
    pub(crate) fn weights_finite(&self, gpu: &Gpu, kernels: &Kernels) -> Result<bool> {
        let total = gpu.zeros(8, "weight check")?;
        kernels.sum_squares(self.master.ptr(), self.len, total.ptr())?;
        Ok(gpu.read::<f64>(total.ptr(), 1)?[0].is_finite())
    }
}
