//! The trained LoRA matrices of a CPU model as a PEFT adapter directory.

use std::collections::BTreeMap;
use std::path::Path;

use qlora_core::fsutil::AtomicDir;
use qlora_core::peft::{AdapterConfig, LoraAdapter, LoraPair};
use qlora_core::{DType, Result};

use crate::cpu::{compute_error, Model};

/// The adapter of `model` (f32, as PEFT saves a QLoRA adapter trained in f32).
pub fn model_adapter(model: &Model, config: &AdapterConfig) -> Result<LoraAdapter> {
    let mut pairs = Vec::new();
    for adapter in model.lora_adapters() {
        let (r, in_features) = adapter.a.as_tensor().dims2().map_err(compute_error)?;
        let (out_features, _) = adapter.b.as_tensor().dims2().map_err(compute_error)?;
        let flat = |t: &candle_core::Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        pairs.push((
            adapter.module.clone(),
            LoraPair {
                a: flat(adapter.a.as_tensor()).map_err(compute_error)?,
                b: flat(adapter.b.as_tensor()).map_err(compute_error)?,
                r,
                in_features,
                out_features,
            },
        ));
    }
    Ok(adapter_from_pairs(pairs, config))
}

/// An f32 adapter of `(module path, A/B pair)`s (any engine's trained matrices).
pub fn adapter_from_pairs(pairs: Vec<(String, LoraPair)>, config: &AdapterConfig) -> LoraAdapter {
    LoraAdapter {
        config: config.clone(),
        modules: pairs.into_iter().collect::<BTreeMap<_, _>>(),
        dtype: DType::F32,
    }
}

/// Writes `adapter` to `dir` as a whole: built beside it and renamed into place, replacing an
/// earlier adapter there.
pub fn save_adapter(adapter: &LoraAdapter, dir: &Path) -> Result<()> {
    let out = AtomicDir::create(dir, true)?;
    adapter.save(out.path())?;
    out.commit()?;
    Ok(())
}
