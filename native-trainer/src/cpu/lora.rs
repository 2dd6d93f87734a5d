//! Linear projections with a frozen base weight and an optional LoRA adapter, as PEFT's
//! `lora.Linear`: `y = x W^T + b + scale * dropout(x) A^T B^T`.

use super::ops::frozen_matmul;
use super::weights::{read_f32, Weights};
use super::Mode;
use candle_core::{Device, Tensor, Var};
use qlora_core::arch::{
    peft_tensor_name, ArchDescription, LinearSpec, LoraConfig, LoraMatrix, PeftNaming,
};
use qlora_core::checkpoint::TensorSource;
use qlora_core::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Where the adapter matrices' first values come from.
pub enum LoraInit<'a> {
    /// PEFT's default: `A` uniform in `[-1/sqrt(in), 1/sqrt(in)]` (`kaiming_uniform_` with
    /// `a = sqrt(5)`), `B = 0`, drawn adapter after adapter in model order from one seeded RNG.
    Random { seed: u64 },
    /// Read from a checkpoint holding PEFT names (a saved adapter, or a live model's parameters).
    FromSource {
        source: &'a dyn TensorSource,
        naming: PeftNaming,
    },
}

/// What [`Model::load`](super::Model::load) needs to attach LoRA adapters.
pub struct LoraSetup<'a> {
    pub config: LoraConfig,
    pub init: LoraInit<'a>,
}

/// The trainable low-rank update of one projection.
pub struct LoraAdapter {
    /// The adapted module's path in the model.
    pub module: String,
    /// `[r, in_features]`
    pub a: Var,
    /// `[out_features, r]`
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// `scale * dropout(x) A^T B^T` for `x` `[m, in]`: `[m, out]`, in PEFT's order of operations.
    fn forward(&self, x: &Tensor, mode: &mut Mode<'_>) -> candle_core::Result<Tensor> {
        let x = mode.dropout(x, self.dropout)?;
        let (a, b) = match mode {
            // Without this, every activation downstream of an adapter would hold the graph
            // back to the Vars until the output is dropped.
            Mode::Inference => (self.a.as_tensor().detach(), self.b.as_tensor().detach()),
            Mode::Eval | Mode::Train(_) => (self.a.as_tensor().clone(), self.b.as_tensor().clone()),
        };
        let down = x.matmul(&a.t()?)?; // [m, r]
        let up = down.matmul(&b.t()?)?; // [m, out]
        up.affine(self.scale, 0.0)
    }
}

/// Makes the adapters of a model while it loads, in model order.
pub(crate) struct AdapterFactory<'a> {
    config: &'a LoraConfig,
    source: AdapterSource<'a>,
}

enum AdapterSource<'a> {
    Random(Box<StdRng>),
    Checkpoint {
        source: &'a dyn TensorSource,
        naming: &'a PeftNaming,
    },
}

impl<'a> AdapterFactory<'a> {
    /// Checks the LoRA configuration against the model (ranks, dropout, targets that exist).
    pub(crate) fn new(
        setup: &'a LoraSetup<'a>,
        description: &ArchDescription,
    ) -> Result<AdapterFactory<'a>> {
        setup.config.targets(description)?;
        let source = match &setup.init {
            LoraInit::Random { seed } => {
                AdapterSource::Random(Box::new(StdRng::seed_from_u64(*seed)))
            }
            LoraInit::FromSource { source, naming } => AdapterSource::Checkpoint {
                source: *source,
                naming,
            },
        };
        Ok(AdapterFactory {
            config: &setup.config,
            source,
        })
    }

    /// The adapter of `linear`, or `None` when it is not a target.
    pub(crate) fn adapter(&mut self, linear: &LinearSpec) -> Result<Option<LoraAdapter>> {
        if !self.config.is_target(linear) {
            return Ok(None);
        }
        let r = self.config.r;
        let [a_shape, b_shape] = [LoraMatrix::A, LoraMatrix::B].map(|m| m.shape(r, linear));
        let (a, b) = match &mut self.source {
            AdapterSource::Random(rng) => {
                let bound = 1.0 / (linear.in_features as f64).sqrt();
                let a: Vec<f32> = (0..a_shape.iter().product::<usize>())
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, &a_shape, &Device::Cpu);
                let b = Tensor::zeros(&b_shape, candle_core::DType::F32, &Device::Cpu);
                (
                    a.map_err(super::compute_error)?,
                    b.map_err(super::compute_error)?,
                )
            }
            AdapterSource::Checkpoint { source, naming } => {
                let name = |m| peft_tensor_name(&linear.module, m, naming);
                (
                    read_f32(*source, &name(LoraMatrix::A), &a_shape)?,
                    read_f32(*source, &name(LoraMatrix::B), &b_shape)?,
                )
            }
        };
        Ok(Some(LoraAdapter {
            module: linear.module.clone(),
            a: Var::from_tensor(&a).map_err(super::compute_error)?,
            b: Var::from_tensor(&b).map_err(super::compute_error)?,
            scale: self.config.scale(),
            dropout: self.config.dropout,
        }))
    }
}

/// A linear projection: frozen `W` `[out, in]` and bias `[out]`, plus a LoRA adapter if targeted.
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

impl Linear {
    /// Reads `W` (and `b`) of `spec` as f32 (a 4-bit source hands them dequantized) and attaches
    /// an adapter when `adapters` targets it.
    pub(crate) fn load(
        spec: &LinearSpec,
        weights: &Weights<'_>,
        adapters: Option<&mut AdapterFactory<'_>>,
    ) -> Result<Linear> {
        let weight = weights.tensor(&spec.weight_name(), &[spec.out_features, spec.in_features])?;
        let bias = spec
            .bias_name()
            .map(|name| weights.tensor(&name, &[spec.out_features]))
            .transpose()?;
        let lora = match adapters {
            Some(factory) => factory.adapter(spec)?,
            None => None,
        };
        Ok(Linear { weight, bias, lora })
    }

    /// `x` `[.., in]` -> `[.., out]`.
    pub(crate) fn forward(&self, x: &Tensor, mode: &mut Mode<'_>) -> candle_core::Result<Tensor> {
        let (out_features, in_features) = self.weight.dims2()?;
        let Some((_, leading)) = x.dims().split_last() else {
            candle_core::bail!("linear: a scalar input has no feature dimension");
        };
        let out_dims: Vec<usize> = leading.iter().copied().chain([out_features]).collect();
        let x = x.reshape((leading.iter().product::<usize>(), in_features))?; // [m, in]
        let mut y = frozen_matmul(&x, &self.weight)?; // [m, out]
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some(lora) = &self.lora {
            y = (y + lora.forward(&x, mode)?)?;
        }
        y.reshape(out_dims)
    }

    pub(crate) fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3 → 2 projection with a rank-1 adapter whose matrices are not zero.
    fn adapted_linear() -> Linear {
        let cpu = &Device::Cpu;
        let var = |values: Vec<f32>, shape: (usize, usize)| {
            Var::from_tensor(&Tensor::from_vec(values, shape, cpu).unwrap()).unwrap()
        };
        Linear {
            weight: Tensor::from_vec(vec![1.0f32, 0.0, -1.0, 0.5, 2.0, 0.0], (2, 3), cpu).unwrap(),
            bias: None,
            lora: Some(LoraAdapter {
                module: "m".into(),
                a: var(vec![0.5, -1.0, 2.0], (1, 3)),
                b: var(vec![1.5, -0.5], (2, 1)),
                scale: 2.0,
                dropout: 0.0,
            }),
        }
    }

    #[test]
    fn inference_gives_the_eval_output_without_a_graph_to_the_adapter() {
        let linear = adapted_linear();
        let x =
            Tensor::from_vec(vec![1.0f32, 2.0, 3.0, -1.0, 0.0, 1.0], (2, 3), &Device::Cpu).unwrap();
        let eval = linear.forward(&x, &mut Mode::Eval).unwrap();
        let inference = linear.forward(&x, &mut Mode::Inference).unwrap();
        assert_eq!(
            eval.to_vec2::<f32>().unwrap(),
            inference.to_vec2::<f32>().unwrap()
        );
        let lora = linear.lora().unwrap();
        let grads = eval.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(lora.a.as_tensor()).is_some());
        // Nothing of the inference output leads back to the Vars: no graph was kept.
        let grads = inference.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(lora.a.as_tensor()).is_none());
        assert!(grads.get(lora.b.as_tensor()).is_none());
    }
}
