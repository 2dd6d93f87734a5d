//! Folding a PEFT LoRA adapter into its base model's weights (`merge_and_unload`), and comparing
//! the merged model with the base + adapter it came from.
//!
//! - [`MergedWeights`]: the base checkpoint seen with `W + scale·B·A` in place of every adapted
//!   weight, checked against the model and the adapter's config before anything is read.
//! - [`report`]: logits of the unmerged and merged models on a few prompts, compared.

pub mod report;

use std::collections::BTreeMap;

use qlora_core::arch::{peft_tensor_name, LoraMatrix, ModelConfig, PeftNaming};
use qlora_core::checkpoint::{RawTensor, TensorInfo, TensorSource};
use qlora_core::peft::{LoraAdapter, LoraPair};
use qlora_core::{DType, Error, Result};

/// A base checkpoint whose adapted linear weights read merged, `W + scale·B·A`, as f32 (whatever
/// the base's dtype: rounding is left to whoever stores them); every other tensor, and
/// [`TensorSource::tensor_infos`], as the base has them.
pub struct MergedWeights<'a> {
    base: &'a dyn TensorSource,
    /// Weight name (`….q_proj.weight`) → the adapter pair merged into it.
    merged: BTreeMap<String, &'a LoraPair>,
    scale: f32,
}

impl<'a> MergedWeights<'a> {
    /// Pairs every module of `adapter` with a linear weight of `config`'s model in `base`.
    /// `adapter_file` names the adapter's weights in errors: a module the model does not have or
    /// the config does not target, a pair whose shape is not the weight's, a target without a
    /// pair, a weight the base lacks.
    pub fn new(
        config: &ModelConfig,
        base: &'a dyn TensorSource,
        adapter: &'a LoraAdapter,
        adapter_file: &str,
    ) -> Result<MergedWeights<'a>> {
        let description = config.describe();
        let lora = &adapter.config.lora;
        let targets = lora.targets(&description)?;
        let linears = description.linears();
        let base_infos: BTreeMap<String, TensorInfo> = base
            .tensor_infos()
            .into_iter()
            .map(|i| (i.name.clone(), i))
            .collect();
        let a_name = |module: &str| peft_tensor_name(module, LoraMatrix::A, &PeftNaming::Saved);
        let mut merged = BTreeMap::new();
        for (module, pair) in &adapter.modules {
            let Some(linear) = linears.iter().find(|l| l.module == *module) else {
                return Err(Error::tensor(
                    adapter_file,
                    a_name(module),
                    format!(
                        "has no matching base weight: this {} model has no linear projection `{module}`",
                        config.architecture()
                    ),
                ));
            };
            if !lora.is_target(linear) {
                return Err(Error::tensor(
                    adapter_file,
                    a_name(module),
                    format!(
                        "adapts `{module}`, which the adapter's target_modules {:?} do not name",
                        lora.target_modules
                    ),
                ));
            }
            if (pair.out_features, pair.in_features) != (linear.out_features, linear.in_features) {
                return Err(Error::tensor(
                    adapter_file,
                    a_name(module),
                    format!(
                        "lora_B·lora_A is [{}, {}], but the base weight is [{}, {}]",
                        pair.out_features,
                        pair.in_features,
                        linear.out_features,
                        linear.in_features
                    ),
                ));
            }
            let weight = linear.weight_name();
            let shape = [linear.out_features, linear.in_features];
            match base_infos.get(&weight) {
                Some(info) if info.shape == shape && info.dtype.is_float() => {}
                Some(info) => {
                    return Err(Error::tensor(
                        base.file_of(&weight).unwrap_or_default(),
                        &weight,
                        format!(
                            "is {} {:?}, expected a float [{}, {}] to merge `{module}` into",
                            info.dtype, info.shape, shape[0], shape[1]
                        ),
                    ))
                }
                None => {
                    return Err(Error::tensor(
                        "the base checkpoint",
                        &weight,
                        format!("missing: the adapter has `{module}` to merge into it"),
                    ))
                }
            }
            merged.insert(weight, pair);
        }
        if let Some(missing) = targets
            .iter()
            .find(|t| !adapter.modules.contains_key(&t.module))
        {
            return Err(Error::tensor(
                adapter_file,
                a_name(&missing.module),
                "missing: target_modules name this module, but the adapter has no lora_A/lora_B for it",
            ));
        }
        Ok(MergedWeights {
            base,
            merged,
            scale: lora.scale() as f32,
        })
    }

    /// The names of the merged weights, sorted.
    pub fn merged_weights(&self) -> impl Iterator<Item = &str> {
        self.merged.keys().map(String::as_str)
    }

    /// The factor on `B·A` (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA).
    pub fn scale(&self) -> f32 {
        self.scale
    }
}

impl TensorSource for MergedWeights<'_> {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.base.tensor_infos()
    }

    fn read(&self, name: &str) -> Result<RawTensor> {
        let raw = self.base.read(name)?;
        let Some(pair) = self.merged.get(name) else {
            return Ok(raw);
        };
        let file = || self.base.file_of(name).unwrap_or_default();
        let mut values = raw.to_f32().ok_or_else(|| {
            Error::tensor(file(), name, format!("{} is not a float type", raw.dtype))
        })?;
        pair.merge_into(&mut values, self.scale)
            .map_err(|e| Error::tensor(file(), name, e.to_string()))?;
        Ok(RawTensor {
            dtype: DType::F32,
            shape: raw.shape,
            data: qlora_core::dtype::from_f32(DType::F32, &values),
        })
    }

    fn file_of(&self, name: &str) -> Option<String> {
        self.base.file_of(name)
    }
}
