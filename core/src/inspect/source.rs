//! Inspecting the tensors of a checkpoint: which weights a model quantizes, and reading one as
//! floats with errors that name its file and the tensor. The CLI (files on disk) and the web
//! page (files in memory) both go through here.

use std::collections::BTreeSet;

use crate::arch::{ModelConfig, TensorRole, TensorSpec};
use crate::checkpoint::TensorSource;
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

/// Reads `name` from `source` and hands its values and shape to `use_values`; an error of
/// either (a tensor that is not float, a value that is not finite, ...) names the file that
/// holds the tensor (or `source_label`) and the tensor.
pub fn with_weights<R>(
    source: &dyn TensorSource,
    source_label: &str,
    name: &str,
    use_values: impl FnOnce(FloatSlice<'_>, &[usize]) -> Result<R>,
) -> Result<R> {
    let in_tensor = |e: Error| match e {
        // Already names its file (and tensor).
        Error::Io { .. } | Error::Format { .. } | Error::Tensor { .. } => e,
        Error::Invalid(msg) => Error::tensor(
            source
                .file_of(name)
                .unwrap_or_else(|| source_label.to_string()),
            name,
            msg,
        ),
    };
    let tensor = source.read(name)?;
    let data = FloatData::from_le_bytes(tensor.dtype, &tensor.data).map_err(in_tensor)?;
    use_values(data.as_slice(), &tensor.shape).map_err(in_tensor)
}
