//! Frozen parameters on the GPU: 4-bit projections kept packed, everything else in the
//! activation precision.

use half::bf16;
use qlora_core::arch::{EmbeddingSpec, LinearSpec, NormKind, NormSpec};
use qlora_core::{DType, Result};
use qlora_kernels::{DeviceBuffer, DeviceQuantized, Gpu, Precision};

use crate::cpu::weights::Weights;

/// `values` (f32) on the device as `precision`.
pub(crate) fn upload_as(
    gpu: &Gpu,
    values: &[f32],
    precision: Precision,
    what: &str,
) -> Result<DeviceBuffer> {
    match precision {
        Precision::F32 => gpu.upload(values, what),
        Precision::Bf16 => {
            let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
            gpu.upload(&v, what)
        }
    }
}

/// A projection's frozen weight `[out, in]`.
pub(crate) enum FrozenWeight {
    /// bitsandbytes 4-bit, dequantized into a scratch buffer before each use.
    Packed(DeviceQuantized),
    Dense(DeviceBuffer),
}

pub(crate) struct Norm {
    pub kind: NormKind,
    pub weight: DeviceBuffer,
    pub bias: Option<DeviceBuffer>,
    pub eps: f32,
    pub dim: usize,
}

/// Reads frozen tensors from a checkpoint onto the GPU.
pub(crate) struct Loader<'a> {
    pub gpu: &'a Gpu,
    pub precision: Precision,
    pub weights: Weights<'a>,
}

impl Loader<'_> {
    /// Tensor `name`, which must have `shape`, in the activation precision. A bf16 tensor for a
    /// bf16 run is uploaded as stored.
    pub(crate) fn dense(&self, name: &str, shape: &[usize]) -> Result<DeviceBuffer> {
        let source = self.weights.source();
        let stored = self.weights.stored_name(name);
        let raw = source.read(stored)?;
        let file = || {
            source
                .file_of(stored)
                .unwrap_or_else(|| "checkpoint".into())
        };
        if raw.shape != shape {
            return Err(qlora_core::Error::tensor(
                file(),
                stored,
                format!("shape {:?}, expected {shape:?}", raw.shape),
            ));
        }
        if raw.dtype == DType::BF16 && self.precision == Precision::Bf16 {
            return self.gpu.upload(&raw.data, name);
        }
        let values = raw.to_f32().ok_or_else(|| {
            qlora_core::Error::tensor(
                file(),
                stored,
                format!("dtype {} is not a float type", raw.dtype),
            )
        })?;
        upload_as(self.gpu, &values, self.precision, name)
    }

    pub(crate) fn embedding(&self, spec: &EmbeddingSpec) -> Result<DeviceBuffer> {
        self.dense(&spec.name, &[spec.vocab_size, spec.hidden_size])
    }

    /// The weight of `spec`: packed when the checkpoint holds it 4-bit, else dense.
    pub(crate) fn linear_weight(&self, spec: &LinearSpec) -> Result<FrozenWeight> {
        let name = spec.weight_name();
        let stored = self.weights.stored_name(&name);
        match self.weights.source().quantized(stored) {
            Some(q) => {
                let q = q?;
                if q.shape != [spec.out_features, spec.in_features] {
                    return Err(qlora_core::Error::tensor(
                        self.weights.source().file_of(stored).unwrap_or_default(),
                        stored,
                        format!(
                            "4-bit shape {:?}, expected {:?}",
                            q.shape,
                            [spec.out_features, spec.in_features]
                        ),
                    ));
                }
                Ok(FrozenWeight::Packed(DeviceQuantized::upload(
                    self.gpu, &q, stored,
                )?))
            }
            None => Ok(FrozenWeight::Dense(
                self.dense(&name, &[spec.out_features, spec.in_features])?,
            )),
        }
    }

    pub(crate) fn bias(&self, spec: &LinearSpec) -> Result<Option<DeviceBuffer>> {
        spec.bias_name()
            .map(|n| self.dense(&n, &[spec.out_features]))
            .transpose()
    }

    pub(crate) fn norm(&self, spec: &NormSpec) -> Result<Norm> {
        Ok(Norm {
            kind: spec.kind,
            weight: self.dense(&spec.weight_name(), &[spec.dim])?,
            bias: spec
                .bias_name()
                .map(|n| self.dense(&n, &[spec.dim]))
                .transpose()?,
            eps: spec.eps as f32,
            dim: spec.dim,
        })
    }
}
