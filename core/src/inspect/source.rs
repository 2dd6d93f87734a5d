//! Inspecting the tensors of a checkpoint: which weights a model quantizes, and reading one as
//! floats with errors that name its file and the tensor. The CLI (files on disk) and the web
//! page (files in memory) both go through here.

use std::collections::BTreeSet;

use super::{summarize_tensor, ModelReport, QuantConfig, TensorSummary};
use crate::arch::{ModelConfig, TensorRole, TensorSpec};
use crate::checkpoint::{RawTensor, TensorSource};
use crate::quant::{FloatData, FloatSlice};
use crate::{Error, Result};

/// Every weight transformers quantizes when it loads `config`'s model in 4 bits, in model
/// order. Errors when the config is already a quantized one's (`config_label` names it) or when
/// `source` (named by `source_label`) lacks one of the weights.
pub fn quantized_weights(
    config: &ModelConfig,
    config_label: &str,
    source: &dyn TensorSource,
    source_label: &str,
) -> Result<Vec<TensorSpec>> {
    if config.quantization.is_some() {
        return Err(Error::format(
            config_label,
            "already a quantized checkpoint (it has a quantization_config); inspect the \
             full-precision one",
        ));
    }
    let present: BTreeSet<String> = source.tensor_infos().into_iter().map(|i| i.name).collect();
    let specs: Vec<TensorSpec> = config
        .describe()
        .tensors()
        .into_iter()
        .filter(|s| s.role == TensorRole::LinearWeight)
        .collect();
    if let Some(missing) = specs.iter().find(|s| !present.contains(&s.name)) {
        return Err(Error::format(
            source_label,
            format!(
                "tensor `{}` that {config_label} calls for is missing",
                missing.name
            ),
        ));
    }
    Ok(specs)
}

/// A tensor read from a checkpoint to inspect; errors about it name its file and itself.
pub struct SourceTensor {
    file: String,
    name: String,
    raw: RawTensor,
}

impl SourceTensor {
    /// Reads `name` from `source` (`source_label` names the checkpoint where no file does).
    pub fn read(source: &dyn TensorSource, source_label: &str, name: &str) -> Result<SourceTensor> {
        Ok(SourceTensor {
            raw: source.read(name)?,
            file: source
                .file_of(name)
                .unwrap_or_else(|| source_label.to_string()),
            name: name.to_string(),
        })
    }

    /// The values, in their own dtype; an error when the tensor is not a float one.
    pub fn values(&self) -> Result<FloatData<'_>> {
        FloatData::from_le_bytes(self.raw.dtype, &self.raw.data).map_err(|e| self.locate(e))
    }

    pub fn shape(&self) -> &[usize] {
        &self.raw.shape
    }

    /// `e`, from work on this tensor, naming the file and the tensor (unless it names a file
    /// already).
    pub fn locate(&self, e: Error) -> Error {
        match e {
            Error::Io { .. } | Error::Format { .. } | Error::Tensor { .. } => e,
            Error::Invalid(msg) => Error::tensor(&self.file, &self.name, msg),
        }
    }
}

/// Reads `name` from `source` and hands its values and shape to `use_values`; an error of
/// either (a tensor that is not float, a value that is not finite, ...) names the file that
/// holds the tensor (or `source_label`) and the tensor.
pub fn with_weights<R>(
    source: &dyn TensorSource,
    source_label: &str,
    name: &str,
    use_values: impl FnOnce(FloatSlice<'_>, &[usize]) -> Result<R>,
) -> Result<R> {
    let tensor = SourceTensor::read(source, source_label, name)?;
    let values = tensor.values()?;
    use_values(values.as_slice(), tensor.shape()).map_err(|e| tensor.locate(e))
}

/// [`summarize_tensor`] of every weight [`quantized_weights`] lists, one configuration of one
/// tensor a step, so that a caller can pause between steps (the web page yields to the browser
/// there) and show progress; then [`ModelReport::new`]. Each configuration's summary is
/// computed on its own, so the steps give what one `summarize_tensor` call per tensor gives.
pub struct ModelInspection {
    source_label: String,
    configs: Vec<QuantConfig>,
    specs: Vec<TensorSpec>,
    tensors: Vec<TensorSummary>,
    /// The tensor being summarized, read once, and its summary so far (some configurations).
    current: Option<(SourceTensor, TensorSummary)>,
}

impl ModelInspection {
    /// Lists the weights to inspect (errors as [`quantized_weights`]); reads nothing yet.
    pub fn new(
        config: &ModelConfig,
        config_label: &str,
        source: &dyn TensorSource,
        source_label: &str,
        configs: Vec<QuantConfig>,
    ) -> Result<ModelInspection> {
        let specs = quantized_weights(config, config_label, source, source_label)?;
        Ok(ModelInspection {
            source_label: source_label.to_string(),
            tensors: Vec::with_capacity(specs.len()),
            configs,
            specs,
            current: None,
        })
    }

    /// Every weight to inspect, in order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// How many of [`Self::specs`] are summarized in full.
    pub fn tensors_done(&self) -> usize {
        self.tensors.len()
    }

    /// The weight the next [`Self::step`] works on; `None` when all are done.
    pub fn next_tensor(&self) -> Option<&TensorSpec> {
        self.specs.get(self.tensors.len())
    }

    /// One step per configuration of each weight.
    pub fn steps(&self) -> usize {
        self.specs.len() * self.configs.len()
    }

    pub fn steps_done(&self) -> usize {
        self.tensors.len() * self.configs.len()
            + self.current.as_ref().map_or(0, |(_, s)| s.configs.len())
    }

    /// Summarizes the next configuration of the next weight, read from `source` (the
    /// checkpoint given to `new`) when the step is its first.
    pub fn step(&mut self, source: &dyn TensorSource) -> Result<()> {
        let Some(spec) = self.specs.get(self.tensors.len()) else {
            return Ok(());
        };
        let (tensor, partial) = match self.current.take() {
            Some((tensor, partial)) => (tensor, Some(partial)),
            None => (
                SourceTensor::read(source, &self.source_label, &spec.name)?,
                None,
            ),
        };
        let done = partial.as_ref().map_or(0, |p| p.configs.len());
        let config = self.configs[done];
        let mut summary = {
            let values = tensor.values()?;
            summarize_tensor(&spec.name, values.as_slice(), tensor.shape(), &[config])
                .map_err(|e| tensor.locate(e))?
        };
        if let Some(mut partial) = partial {
            partial.configs.append(&mut summary.configs);
            summary = partial;
        }
        if summary.configs.len() == self.configs.len() {
            self.tensors.push(summary);
        } else {
            self.current = Some((tensor, summary));
        }
        Ok(())
    }

    /// Runs the steps of the next weight that are left.
    pub fn step_tensor(&mut self, source: &dyn TensorSource) -> Result<()> {
        let done = self.tensors.len();
        while self.tensors.len() == done && self.next_tensor().is_some() {
            self.step(source)?;
        }
        Ok(())
    }

    /// Summarizes the weights left and returns the report.
    pub fn finish(mut self, source: &dyn TensorSource) -> Result<ModelReport> {
        while self.next_tensor().is_some() {
            self.step(source)?;
        }
        Ok(ModelReport::new(self.configs, self.tensors))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::checkpoint::{open_in_memory, BoxedSource};
    use crate::inspect::quant_configs;
    use crate::inspect::summarize_tensor;

    fn golden(rel: &str) -> Vec<u8> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/golden/");
        std::fs::read(format!("{dir}{rel}")).unwrap()
    }

    fn config(rel: &str) -> ModelConfig {
        ModelConfig::parse(&String::from_utf8(golden(rel)).unwrap(), rel).unwrap()
    }

    fn tiny_bloom() -> BoxedSource {
        let files = BTreeMap::from([(
            "model.safetensors".to_string(),
            golden("tiny-bloom/model.safetensors"),
        )]);
        open_in_memory("tiny-bloom", files).unwrap()
    }

    #[test]
    fn stepping_the_model_gives_every_quantized_weight() {
        let source = tiny_bloom();
        let config = config("tiny-bloom/config.json");
        let mut job = ModelInspection::new(
            &config,
            "config.json",
            &*source,
            "tiny-bloom",
            quant_configs(&[64]),
        )
        .unwrap();
        // Two layers × (query_key_value, dense, dense_h_to_4h, dense_4h_to_h).
        assert_eq!(job.specs().len(), 8);
        assert_eq!(job.steps(), 8 * 4);
        job.step(&*source).unwrap();
        assert_eq!((job.tensors_done(), job.steps_done()), (0, 1));
        job.step_tensor(&*source).unwrap();
        assert_eq!((job.tensors_done(), job.steps_done()), (1, 4));
        let report = job.finish(&*source).unwrap();
        // Step by step, the same as all configurations at once.
        let first = &report.tensors[0];
        let at_once = with_weights(&*source, "tiny-bloom", &first.name, |data, shape| {
            summarize_tensor(&first.name, data, shape, &quant_configs(&[64]))
        })
        .unwrap();
        assert_eq!(first, &at_once);
        assert_eq!(report.tensors.len(), 8);
        assert_eq!(report.heat_maps[0].layers, [0, 1]);
    }

    #[test]
    fn refuses_a_quantized_config_and_a_missing_weight() {
        let source = tiny_bloom();
        let err = quantized_weights(
            &config("tiny-bloom-nf4/config.json"),
            "nf4/config.json",
            &*source,
            "tiny-bloom",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("nf4/config.json: already a quantized checkpoint"),
            "{err}"
        );

        // The same checkpoint, less one weight.
        let config = config("tiny-bloom/config.json");
        let names: Vec<String> = source
            .tensor_infos()
            .into_iter()
            .map(|i| i.name)
            .filter(|n| n != "transformer.h.1.mlp.dense_4h_to_h.weight")
            .collect();
        struct Without<'a>(&'a BoxedSource, Vec<String>);
        impl TensorSource for Without<'_> {
            fn tensor_infos(&self) -> Vec<crate::checkpoint::TensorInfo> {
                let infos = self.0.tensor_infos();
                infos
                    .into_iter()
                    .filter(|i| self.1.contains(&i.name))
                    .collect()
            }
            fn read(&self, name: &str) -> Result<RawTensor> {
                self.0.read(name)
            }
            fn file_of(&self, name: &str) -> Option<String> {
                self.0.file_of(name)
            }
        }
        let err = quantized_weights(&config, "config.json", &Without(&source, names), "ckpt")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "ckpt: tensor `transformer.h.1.mlp.dense_4h_to_h.weight` that config.json calls for \
             is missing"
        );
    }

    #[test]
    fn errors_name_the_file_and_the_tensor() {
        let source = tiny_bloom();
        let name = "transformer.h.0.self_attention.query_key_value.weight";
        let err = with_weights(&*source, "tiny-bloom", name, |_, _| -> Result<()> {
            Err(Error::Invalid("3 values are not finite".into()))
        })
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            format!("model.safetensors: tensor `{name}`: 3 values are not finite")
        );
    }
}
