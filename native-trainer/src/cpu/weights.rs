//! Frozen f32 tensors from a checkpoint, each checked against the shape the architecture expects.

use super::ops::Norm;
use candle_core::{Device, Tensor};
use qlora_core::arch::{ArchDescription, EmbeddingSpec, NormSpec};
use qlora_core::checkpoint::{StoredNames, TensorSource};
use qlora_core::{Error, Result};

pub(crate) struct Weights<'a> {
    source: &'a dyn TensorSource,
    names: StoredNames,
}

impl<'a> Weights<'a> {
    /// Reads the tensors of `description` from `source`, under the names it stores them by.
    pub(crate) fn new(source: &'a dyn TensorSource, description: &ArchDescription) -> Weights<'a> {
        Weights {
            source,
            names: StoredNames::of(source, description),
        }
    }

    /// The tensor `name` as f32, which must have `shape`. Errors name the file and the tensor.
    pub(crate) fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        read_f32(self.source, self.stored_name(name), shape)
    }

    /// The name `name` has in the checkpoint.
    pub(crate) fn stored_name<'n>(&self, name: &'n str) -> &'n str {
        self.names.stored(name)
    }

    pub(crate) fn source(&self) -> &'a dyn TensorSource {
        self.source
    }

    pub(crate) fn embedding(&self, spec: &EmbeddingSpec) -> Result<Tensor> {
        self.tensor(&spec.name, &[spec.vocab_size, spec.hidden_size])
    }

    pub(crate) fn norm(&self, spec: &NormSpec) -> Result<Norm> {
        let weight = self.tensor(&spec.weight_name(), &[spec.dim])?;
        let bias = spec
            .bias_name()
            .map(|name| self.tensor(&name, &[spec.dim]))
            .transpose()?;
        Ok(Norm::new(spec, weight, bias))
    }
}

/// Reads `name` from `source` as an f32 tensor of `shape` on the CPU.
pub(crate) fn read_f32(source: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Tensor> {
    let raw = source.read(name)?;
    let file = || source.file_of(name).unwrap_or_else(|| "checkpoint".into());
    if raw.shape != shape {
        return Err(Error::tensor(
            file(),
            name,
            format!("shape {:?}, expected {shape:?}", raw.shape),
        ));
    }
    let values = raw.to_f32().ok_or_else(|| {
        Error::tensor(
            file(),
            name,
            format!("dtype {} is not a float type", raw.dtype),
        )
    })?;
    let expected: usize = shape.iter().product();
    if values.len() != expected {
        return Err(Error::tensor(
            file(),
            name,
            format!(
                "holds {} values, shape {shape:?} needs {expected}",
                values.len()
            ),
        ));
    }
    Tensor::from_vec(values, shape, &Device::Cpu).map_err(super::compute_error)
}
