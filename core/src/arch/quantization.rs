//! The `quantization_config` block transformers writes into the `config.json` of a checkpoint
//! saved with bitsandbytes (`BitsAndBytesConfig`).

use super::json::Fields;
pub use crate::quant::QuantType;
use crate::{DType, Result};

/// A parsed `quantization_config`; defaults are `BitsAndBytesConfig`'s.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizationConfig {
    /// `bitsandbytes` for the checkpoints qlora writes and reads.
    pub quant_method: String,
    pub load_in_4bit: bool,
    pub load_in_8bit: bool,
    /// `bnb_4bit_quant_type` (default fp4).
    pub quant_type: QuantType,
    /// `bnb_4bit_use_double_quant`: absmax values themselves quantized to 8 bits.
    pub use_double_quant: bool,
    /// `bnb_4bit_compute_dtype` (default float32): the dtype 4-bit weights are dequantized to.
    pub compute_dtype: DType,
    /// `bnb_4bit_quant_storage` (default uint8): the element type the packed codes are stored as.
    pub quant_storage: DType,
    /// `llm_int8_skip_modules`: modules left in full precision.
    pub skip_modules: Vec<String>,
    /// The block as it was.
    pub raw: serde_json::Value,
}

impl QuantizationConfig {
    /// Parses the block; `origin` names the `config.json` in errors.
    pub fn from_json(block: &serde_json::Value, origin: &str) -> Result<QuantizationConfig> {
        let f = Fields::new(block, origin)?;
        let quant_type = match f.opt_str("bnb_4bit_quant_type")?.unwrap_or("fp4") {
            "nf4" => QuantType::Nf4,
            "fp4" => QuantType::Fp4,
            other => {
                return Err(f.error(format!(
                    "quantization_config: bnb_4bit_quant_type `{other}` is not nf4 or fp4"
                )))
            }
        };
        Ok(QuantizationConfig {
            quant_method: f.opt_str("quant_method")?.unwrap_or("bitsandbytes").into(),
            load_in_4bit: f.opt_bool("load_in_4bit")?.unwrap_or(false),
            load_in_8bit: f.opt_bool("load_in_8bit")?.unwrap_or(false),
            quant_type,
            use_double_quant: f.opt_bool("bnb_4bit_use_double_quant")?.unwrap_or(false),
            compute_dtype: dtype_field(&f, "bnb_4bit_compute_dtype", DType::F32)?,
            quant_storage: dtype_field(&f, "bnb_4bit_quant_storage", DType::U8)?,
            skip_modules: f.opt_str_list("llm_int8_skip_modules")?.unwrap_or_default(),
            raw: block.clone(),
        })
    }

    /// The block transformers 5 writes for `BitsAndBytesConfig(load_in_4bit=True,
    /// bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype)`.
    pub fn bnb_4bit(quant_type: QuantType, use_double_quant: bool, compute_dtype: DType) -> Self {
        let raw = serde_json::json!({
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": compute_dtype.torch_name(),
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": quant_type.as_str(),
            "bnb_4bit_use_double_quant": use_double_quant,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": null,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": true,
            "load_in_8bit": false,
            "quant_method": "bitsandbytes"
        });
        QuantizationConfig {
            quant_method: "bitsandbytes".into(),
            load_in_4bit: true,
            load_in_8bit: false,
            quant_type,
            use_double_quant,
            compute_dtype,
            quant_storage: DType::U8,
            skip_modules: Vec::new(),
            raw,
        }
    }

    /// Whether the checkpoint holds bitsandbytes 4-bit weights.
    pub fn is_bnb_4bit(&self) -> bool {
        self.quant_method == "bitsandbytes" && self.load_in_4bit
    }
}

/// A torch dtype name (`float32`, `torch.bfloat16`, `uint8`, ...).
fn dtype_field(f: &Fields<'_>, key: &str, default: DType) -> Result<DType> {
    let Some(name) = f.opt_str(key)? else {
        return Ok(default);
    };
    let stripped = name.strip_prefix("torch.").unwrap_or(name);
    DType::parse_float(name)
        .or_else(|| {
            [DType::U8, DType::I8, DType::I32, DType::I64]
                .into_iter()
                .find(|d| d.torch_name() == stripped)
        })
        .ok_or_else(|| {
            f.error(format!(
                "quantization_config: `{key}` is `{name}`, not a torch dtype"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ModelConfig;

    #[test]
    fn parses_the_block_transformers_writes() {
        let text = r#"{"model_type": "bloom", "vocab_size": 512, "hidden_size": 64, "n_layer": 2,
            "n_head": 4, "quantization_config": {"_load_in_4bit": true,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
            "llm_int8_skip_modules": null, "llm_int8_threshold": 6.0, "load_in_4bit": true,
            "load_in_8bit": false, "quant_method": "bitsandbytes"}}"#;
        let q = ModelConfig::parse(text, "config.json")
            .unwrap()
            .quantization
            .unwrap();
        assert!(q.is_bnb_4bit());
        assert_eq!(q.quant_type, QuantType::Nf4);
        assert!(q.use_double_quant);
        assert_eq!((q.compute_dtype, q.quant_storage), (DType::F32, DType::U8));
        assert!(q.skip_modules.is_empty());
        assert_eq!(q.raw["llm_int8_threshold"], 6.0);
    }

    #[test]
    fn defaults_are_bitsandbytes_config_defaults() {
        let q = QuantizationConfig::from_json(
            &serde_json::json!({"load_in_4bit": true, "bnb_4bit_compute_dtype": "torch.bfloat16",
                "llm_int8_skip_modules": ["lm_head"]}),
            "c",
        )
        .unwrap();
        assert_eq!((q.quant_type, q.use_double_quant), (QuantType::Fp4, false));
        assert_eq!(q.compute_dtype, DType::BF16);
        assert_eq!(q.skip_modules, vec!["lm_head".to_string()]);
    }

    #[test]
    fn rejects_unknown_quant_type() {
        let err = QuantizationConfig::from_json(
            &serde_json::json!({"bnb_4bit_quant_type": "int4"}),
            "m/config.json",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("m/config.json: "), "{err}");
    }
}
