//! LoRA adapters as PEFT saves them: `adapter_config.json` and `adapter_model.safetensors` with
//! tensors `base_model.model.<module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].
//!
//! A config read from disk keeps every key PEFT wrote (known or not), so reading and writing an
//! adapter gives back the same files; a config made here carries PEFT 0.21's full set of keys with
//! its defaults, so `PeftModel.from_pretrained` takes it as it is.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::arch::{
    parse_peft_tensor_name, peft_tensor_name, LoraConfig, LoraMatrix, PeftNaming, TargetModules,
};
use crate::checkpoint::{RawTensor, TensorSource};
use crate::{DType, Error, Result};

/// `adapter_config.json`: the LoRA hyper-parameters qlora acts on, plus the whole JSON object
/// as read (or as PEFT 0.21 writes it, for a config made here).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub lora: LoraConfig,
    raw: Map<String, Value>,
}

impl AdapterConfig {
    /// The config PEFT 0.21 writes for `lora` on a causal LM, every key with its default.
    pub fn new(lora: LoraConfig, base_model_name_or_path: Option<String>) -> Self {
        let targets = match &lora.target_modules {
            TargetModules::Names(names) => json!(names),
            TargetModules::AllLinear => json!("all-linear"),
        };
        let raw = json!({
            "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null,
            "auto_mapping": null, "base_model_name_or_path": base_model_name_or_path,
            "bias": "none", "corda_config": null, "ensure_weight_tying": false,
            "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false,
            "inference_mode": true, "init_lora_weights": true, "kasa_config": null,
            "layer_replication": null, "layers_pattern": null, "layers_to_transform": null,
            "loftq_config": {}, "lora_alpha": number(lora.alpha), "lora_bias": false,
            "lora_dropout": lora.dropout, "lora_ga_config": null, "megatron_config": null,
            "megatron_core": "megatron.core", "modules_to_save": null,
            "monteclora_config": null, "peft_type": "LORA", "peft_version": "0.21.2",
            "qalora_group_size": 16, "r": lora.r, "rank_pattern": {}, "revision": null,
            "target_modules": targets, "target_parameters": null,
            "task_type": "CAUSAL_LM", "trainable_token_indices": null, "use_bdlora": null,
            "use_dora": false, "use_qalora": false, "use_rslora": lora.use_rslora,
            "velora_config": null
        });
        let Value::Object(raw) = raw else {
            unreachable!("json! of an object literal")
        };
        AdapterConfig { lora, raw }
    }

    /// Parses `adapter_config.json`; `file` names it in errors. Features qlora does not
    /// implement (DoRA, per-module ranks, extra trainable modules, LoRA biases) are refused
    /// rather than silently dropped.
    pub fn from_json(file: &str, text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(file, format!("not valid JSON: {e}")))?;
        let Value::Object(raw) = value else {
            return Err(Error::format(file, "expected a JSON object"));
        };
        let field = |k: &str| raw.get(k).filter(|v| !v.is_null());
        match field("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(Error::format(
                    file,
                    format!("peft_type is {other:?}; only LORA adapters are supported"),
                ))
            }
        }
        let r = field("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| Error::format(file, "`r` must be a positive integer"))?
            as usize;
        let alpha = field("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::format(file, "`lora_alpha` must be a number"))?;
        let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        let flag = |k: &str| field(k).and_then(Value::as_bool).unwrap_or(false);
        // `fan_in_fan_out` is not refused: it only concerns GPT-2-style `Conv1D` weights, and
        // for the `torch.nn.Linear` (and bitsandbytes `Linear4bit`) projections of every
        // architecture qlora runs PEFT sets it back to false when it loads the adapter.
        for unsupported in ["use_dora", "lora_bias"] {
            if flag(unsupported) {
                return Err(Error::format(
                    file,
                    format!("`{unsupported}: true` is not supported"),
                ));
            }
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if field(k)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(Error::format(file, format!("`{k}` is not supported")));
            }
        }
        if field("modules_to_save").is_some() {
            return Err(Error::format(file, "`modules_to_save` is not supported"));
        }
        if let Some(bias) = field("bias").and_then(Value::as_str) {
            if bias != "none" {
                return Err(Error::format(
                    file,
                    format!("bias = {bias:?} is not supported (only \"none\")"),
                ));
            }
        }
        let target_modules = match field("target_modules") {
            Some(Value::Array(items)) => TargetModules::Names(
                items
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| Error::format(file, "`target_modules` must hold strings"))?,
            ),
            Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(Value::String(s)) => {
                return Err(Error::format(
                    file,
                    format!("`target_modules` as a regular expression ({s:?}) is not supported"),
                ))
            }
            _ => return Err(Error::format(file, "`target_modules` is missing")),
        };
        let lora = LoraConfig {
            r,
            alpha,
            dropout,
            use_rslora: flag("use_rslora"),
            target_modules,
        };
        Ok(AdapterConfig { lora, raw })
    }

    /// The JSON text PEFT writes: keys sorted, two-space indent, no trailing newline.
    pub fn to_json(&self) -> String {
        // serde_json's Map is a BTreeMap here (no `preserve_order`), so keys come out sorted
        // exactly as Python's `json.dumps(sort_keys=True)` sorts them.
        serde_json::to_string_pretty(&Value::Object(self.raw.clone()))
            .expect("a JSON map always serializes")
    }
}

/// Keeps an integer alpha an integer in the JSON (PEFT writes `"lora_alpha": 8`).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The A and B matrices of one adapted module, f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// [r, in_features]
    pub a: Vec<f32>,
    /// [out_features, r]
    pub b: Vec<f32>,
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl LoraPair {
    /// Adds `scale · B·A` to `weight` (`[out_features, in_features]`, row-major): PEFT's
    /// `merge` of a `Linear` / `Linear4bit` adapter, whose delta weight is `B @ A * scaling` in the
    /// weight's own `[out, in]` layout (also for BLOOM's fused `query_key_value`, whose rows B
    /// shares). Summed in f32 over the rank, as torch does for an f32 weight.
    pub fn merge_into(&self, weight: &mut [f32], scale: f32) -> Result<()> {
        let expected = self.out_features * self.in_features;
        if weight.len() != expected {
            return Err(Error::Invalid(format!(
                "the weight holds {} values, but lora_B·lora_A is [{}, {}]",
                weight.len(),
                self.out_features,
                self.in_features
            )));
        }
        for (row, b_row) in weight
            .chunks_exact_mut(self.in_features)
            .zip(self.b.chunks_exact(self.r))
        {
            for (col, w) in row.iter_mut().enumerate() {
                let mut delta = 0.0f32;
                for (k, &b) in b_row.iter().enumerate() {
                    delta += b * self.a[k * self.in_features + col];
                }
                *w += delta * scale;
            }
        }
        Ok(())
    }
}

/// A whole adapter: its config and one A/B pair per adapted module path.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    pub config: AdapterConfig,
    /// Keyed by module path without PEFT's prefix, e.g. `transformer.h.0.self_attention.query_key_value`.
    pub modules: BTreeMap<String, LoraPair>,
    /// The element type the tensors were stored in (written back the same way).
    pub dtype: DType,
}

impl LoraAdapter {
    /// Reads the pairs from `source` (an opened `adapter_model.safetensors` or `.bin`).
    pub fn from_source(config: AdapterConfig, source: &dyn TensorSource) -> Result<Self> {
        let mut halves: BTreeMap<String, [Option<RawTensor>; 2]> = BTreeMap::new();
        let mut dtype = None;
        for info in source.tensor_infos() {
            let file = source.file_of(&info.name).unwrap_or_default();
            let (path, matrix) = parse_peft_tensor_name(&info.name)
                .ok_or_else(|| Error::tensor(&file, &info.name, "not a PEFT LoRA tensor name"))?;
            let which = match matrix {
                LoraMatrix::A => 0,
                LoraMatrix::B => 1,
            };
            let tensor = source.read(&info.name)?;
            if !tensor.dtype.is_float() {
                return Err(Error::tensor(
                    &file,
                    &info.name,
                    format!("dtype {} is not a float type", tensor.dtype),
                ));
            }
            if tensor.shape.len() != 2 {
                return Err(Error::tensor(
                    &file,
                    &info.name,
                    format!("expected a 2-d matrix, found shape {:?}", tensor.shape),
                ));
            }
            dtype.get_or_insert(tensor.dtype);
            halves.entry(path.to_owned()).or_default()[which] = Some(tensor);
        }
        let mut modules = BTreeMap::new();
        for (path, [a, b]) in halves {
            let missing = |matrix| {
                Error::tensor(
                    "adapter_model",
                    peft_tensor_name(&path, matrix, &PeftNaming::Saved),
                    "missing: every adapted module needs lora_A and lora_B",
                )
            };
            let a = a.ok_or_else(|| missing(LoraMatrix::A))?;
            let b = b.ok_or_else(|| missing(LoraMatrix::B))?;
            let (r, in_features) = (a.shape[0], a.shape[1]);
            let out_features = b.shape[0];
            if r != config.lora.r || b.shape[1] != r {
                let a_name = peft_tensor_name(&path, LoraMatrix::A, &PeftNaming::Saved);
                return Err(Error::tensor(
                    source.file_of(&a_name).unwrap_or_default(),
                    a_name,
                    format!(
                        "lora_A is {:?} and lora_B {:?}, but the config says r = {}",
                        a.shape, b.shape, config.lora.r
                    ),
                ));
            }
            let to_f32 = |t: &RawTensor| t.to_f32().expect("checked to be a float type");
            modules.insert(
                path,
                LoraPair {
                    a: to_f32(&a),
                    b: to_f32(&b),
                    r,
                    in_features,
                    out_features,
                },
            );
        }
        Ok(LoraAdapter {
            config,
            modules,
            dtype: dtype.unwrap_or(DType::F32),
        })
    }

    /// The tensors to write into `adapter_model.safetensors`, with PEFT's names, in `self.dtype`.
    pub fn tensors(&self) -> Vec<(String, RawTensor)> {
        let mut out = Vec::with_capacity(self.modules.len() * 2);
        for (path, pair) in &self.modules {
            out.push((
                peft_tensor_name(path, LoraMatrix::A, &PeftNaming::Saved),
                RawTensor {
                    dtype: self.dtype,
                    shape: vec![pair.r, pair.in_features],
                    data: crate::dtype::from_f32(self.dtype, &pair.a),
                },
            ));
            out.push((
                peft_tensor_name(path, LoraMatrix::B, &PeftNaming::Saved),
                RawTensor {
                    dtype: self.dtype,
                    shape: vec![pair.out_features, pair.r],
                    data: crate::dtype::from_f32(self.dtype, &pair.b),
                },
            ));
        }
        out
    }

    /// Number of trainable parameters (all A and B entries).
    pub fn num_parameters(&self) -> usize {
        self.modules.values().map(|p| p.a.len() + p.b.len()).sum()
    }
}

/// The file names PEFT's `save_pretrained` writes.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Older PEFT versions saved the weights as a torch pickle.
pub const LEGACY_WEIGHTS_FILE: &str = "adapter_model.bin";

impl LoraAdapter {
    /// An adapter from the bytes of its two files (the browser hands files over as bytes).
    pub fn from_bytes(config_json: &str, weights: Vec<u8>) -> Result<Self> {
        let config = AdapterConfig::from_json(CONFIG_FILE, config_json)?;
        let source = crate::checkpoint::SafetensorsFile::from_bytes(WEIGHTS_FILE, weights)?;
        LoraAdapter::from_source(config, &source)
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl LoraAdapter {
    /// Reads a PEFT adapter directory (`adapter_model.safetensors`, or `adapter_model.bin`).
    pub fn load(dir: &std::path::Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = AdapterConfig::from_json(&config_path.display().to_string(), &text)?;
        let weights = dir.join(WEIGHTS_FILE);
        let legacy = dir.join(LEGACY_WEIGHTS_FILE);
        let source = if weights.is_file() || !legacy.is_file() {
            crate::checkpoint::open_file(&weights)?
        } else {
            crate::checkpoint::open_file(&legacy)?
        };
        LoraAdapter::from_source(config, source.as_ref())
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (which must
    /// exist), each through a temporary file renamed into place.
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        use std::io::Write;
        let tensors = self.tensors();
        let plan: Vec<_> = tensors
            .iter()
            .map(|(name, t)| crate::checkpoint::TensorInfo {
                name: name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            })
            .collect();
        let mut writer =
            crate::checkpoint::SafetensorsWriter::create(&dir.join(WEIGHTS_FILE), &plan)?;
        for (name, t) in &tensors {
            writer.write_tensor(name, &t.data)?;
        }
        writer.commit()?;
        let config_path = dir.join(CONFIG_FILE);
        let mut file = crate::fsutil::AtomicFile::create(&config_path)?;
        file.write_all(self.config.to_json().as_bytes())
            .map_err(|e| Error::io(&config_path, e))?;
        file.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_refuses_dora_and_keeps_unknown_keys() {
        let lora = LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            use_rslora: false,
            target_modules: TargetModules::Names(vec!["q".into()]),
        };
        let c = AdapterConfig::new(lora.clone(), None);
        let mut v: Value = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(v["lora_alpha"], json!(32));
        v["use_dora"] = json!(true);
        let err = AdapterConfig::from_json("adapter_config.json", &v.to_string()).unwrap_err();
        assert!(err.to_string().contains("use_dora"), "{err}");
        v["use_dora"] = json!(false);
        v["some_future_key"] = json!([1, 2]);
        let back = AdapterConfig::from_json("adapter_config.json", &v.to_string()).unwrap();
        assert!(back.to_json().contains("\"some_future_key\""));
        assert_eq!(back.lora, lora);
    }

    /// A key qlora does not know is written back as read, even a number with more digits than an
    /// f64 holds (found by fuzzing: the parser must round such a number correctly, or the value
    /// it writes reads back one ulp off).
    #[test]
    fn a_long_number_reads_back_as_it_was() {
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::Names(vec!["q_proj".into()]),
        };
        let text = AdapterConfig::new(lora, None).to_json().replacen(
            "{",
            &format!("{{\"qalora_group_size\": {}16,", "4".repeat(97)),
            1,
        );
        let config = AdapterConfig::from_json("adapter_config.json", &text).unwrap();
        let back = AdapterConfig::from_json("adapter_config.json", &config.to_json()).unwrap();
        assert_eq!(back, config);
    }

    /// PEFT resets `fan_in_fan_out` to false for `torch.nn.Linear` targets, the only kind the
    /// supported architectures have, so such a config loads as the same LoRA.
    #[test]
    fn fan_in_fan_out_is_accepted_as_peft_resets_it() {
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::Names(vec!["q_proj".into()]),
        };
        let mut v: Value =
            serde_json::from_str(&AdapterConfig::new(lora.clone(), None).to_json()).unwrap();
        v["fan_in_fan_out"] = json!(true);
        let back = AdapterConfig::from_json("adapter_config.json", &v.to_string()).unwrap();
        assert_eq!(back.lora, lora);
    }

    #[test]
    fn merge_adds_scaled_b_times_a_in_the_weight_layout() {
        // r = 2, in = 3, out = 2.
        let pair = LoraPair {
            a: vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.0],
            b: vec![1.0, 0.0, 2.0, -1.0],
            r: 2,
            in_features: 3,
            out_features: 2,
        };
        let mut w = vec![0.5; 6];
        pair.merge_into(&mut w, 2.0).unwrap();
        // B·A = [[1, 2, 3], [3, 3.5, 6]].
        assert_eq!(w, [2.5, 4.5, 6.5, 6.5, 7.5, 12.5]);
        let err = pair.merge_into(&mut [0.0; 4], 1.0).unwrap_err();
        assert!(err.to_string().contains("[2, 3]"), "{err}");
    }
}
