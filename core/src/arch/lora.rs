//! LoRA as PEFT defines it, independent of any backend: hyper-parameters, which linear projections
//! get an adapter, and the PEFT tensor names of the adapter matrices.
//!
//! For a target `y = x W^T + b` (`W` `[out, in]`) the adapted layer computes
//! `y = x W^T + b + scale * dropout(x) A^T B^T` with `A` `[r, in]`, `B` `[out, r]` and
//! `scale = alpha / r` (or `alpha / sqrt(r)` with rsLoRA).

use super::{ArchDescription, Architecture, LinearSpec};
use crate::{Error, Result};

/// Which modules get an adapter, as PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// A module matches a name when its path equals it or ends with `.<name>` (PEFT's rule for a
    /// list of names).
    Names(Vec<String>),
    /// PEFT's `all-linear`: every linear projection (the LM head is not among them).
    AllLinear,
}

/// LoRA hyper-parameters (PEFT's `LoraConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input, in training mode.
    pub dropout: f64,
    /// rsLoRA: `scale = alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    pub target_modules: TargetModules,
}

impl LoraConfig {
    /// A LoRA on the architecture's default targets ([`Architecture::default_lora_targets`]).
    pub fn with_default_targets(
        arch: Architecture,
        r: usize,
        alpha: f64,
        dropout: f64,
    ) -> LoraConfig {
        LoraConfig {
            r,
            alpha,
            dropout,
            use_rslora: false,
            target_modules: TargetModules::Names(
                arch.default_lora_targets()
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
        }
    }

    /// The factor on `x A^T B^T`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn is_target(&self, linear: &LinearSpec) -> bool {
        match &self.target_modules {
            TargetModules::AllLinear => true,
            TargetModules::Names(names) => names.iter().any(|name| {
                linear.module == *name
                    || linear
                        .module
                        .strip_suffix(name.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }),
        }
    }

    /// The adapted projections of a model, in model order. An error when the hyper-parameters are
    /// out of range or no module matches (PEFT refuses that too).
    pub fn targets<'d>(&self, description: &'d ArchDescription) -> Result<Vec<&'d LinearSpec>> {
        if self.r == 0 {
            return Err(Error::Invalid("LoRA rank r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Invalid(format!(
                "LoRA dropout must be in [0, 1), found {}",
                self.dropout
            )));
        }
        if !self.alpha.is_finite() {
            return Err(Error::Invalid(format!(
                "LoRA alpha must be finite, found {}",
                self.alpha
            )));
        }
        let targets: Vec<_> = description
            .linears()
            .into_iter()
            .filter(|l| self.is_target(l))
            .collect();
        if targets.is_empty() {
            return Err(Error::Invalid(format!(
                "LoRA target modules {:?} match no linear projection of this {} model",
                self.target_modules,
                description.architecture()
            )));
        }
        Ok(targets)
    }
}

/// One of the two adapter matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraMatrix {
    /// `[r, in_features]`, the down-projection.
    A,
    /// `[out_features, r]`, the up-projection.
    B,
}

impl LoraMatrix {
    /// The matrix's shape for an adapter of rank `r` on `linear`.
    pub fn shape(self, r: usize, linear: &LinearSpec) -> [usize; 2] {
        match self {
            LoraMatrix::A => [r, linear.in_features],
            LoraMatrix::B => [linear.out_features, r],
        }
    }

    fn peft_module(self) -> &'static str {
        match self {
            LoraMatrix::A => "lora_A",
            LoraMatrix::B => "lora_B",
        }
    }
}

/// How PEFT spells the parameter names of an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeftNaming {
    /// `adapter_model.safetensors` as `save_pretrained` writes it:
    /// `base_model.model.<module>.lora_A.weight`.
    Saved,
    /// A live PEFT model's `named_parameters()` for the named adapter (`default` unless renamed):
    /// `base_model.model.<module>.lora_A.<adapter>.weight`.
    Live(String),
}

/// The PEFT name of one adapter matrix of the linear projection at `module` (a model path such as
/// `model.layers.0.self_attn.q_proj`). The one place qlora maps its modules to PEFT names.
pub fn peft_tensor_name(module: &str, matrix: LoraMatrix, naming: &PeftNaming) -> String {
    let lora = matrix.peft_module();
    match naming {
        PeftNaming::Saved => format!("base_model.model.{module}.{lora}.weight"),
        PeftNaming::Live(adapter) => format!("base_model.model.{module}.{lora}.{adapter}.weight"),
    }
}

/// The module path and matrix of a PEFT tensor name, saved (`base_model.model.<module>.lora_A.weight`)
/// or live (`...lora_A.<adapter>.weight`); `None` for any other name. The inverse of
/// [`peft_tensor_name`].
pub fn parse_peft_tensor_name(name: &str) -> Option<(&str, LoraMatrix)> {
    let rest = name
        .strip_prefix("base_model.model.")?
        .strip_suffix(".weight")?;
    for (marker, matrix) in [(".lora_A", LoraMatrix::A), (".lora_B", LoraMatrix::B)] {
        if let Some(at) = rest.rfind(marker) {
            let after = &rest[at + marker.len()..];
            // Nothing after the marker (saved) or `.<adapter name>` without dots (live).
            if after.is_empty() || (after.starts_with('.') && !after[1..].contains('.')) {
                return Some((&rest[..at], matrix));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ModelConfig;

    fn tiny_llama() -> ArchDescription {
        ModelConfig::parse(
            r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}"#,
            "config.json",
        )
        .unwrap()
        .describe()
    }

    #[test]
    fn default_targets_are_every_llama_projection() {
        let d = tiny_llama();
        let lora = LoraConfig::with_default_targets(Architecture::Llama, 4, 8.0, 0.0);
        assert_eq!(lora.targets(&d).unwrap().len(), 14);
        assert_eq!(lora.scale(), 2.0);
    }

    #[test]
    fn names_match_whole_path_components() {
        let d = tiny_llama();
        let lora = LoraConfig {
            target_modules: TargetModules::Names(vec![
                "layers.1.self_attn.q_proj".into(),
                "proj".into(),
            ]),
            ..LoraConfig::with_default_targets(Architecture::Llama, 4, 8.0, 0.0)
        };
        let modules: Vec<_> = lora
            .targets(&d)
            .unwrap()
            .iter()
            .map(|l| l.module.clone())
            .collect();
        // `proj` is not a whole component of `q_proj`.
        assert_eq!(modules, vec!["model.layers.1.self_attn.q_proj"]);
    }

    #[test]
    fn rslora_scale_and_unmatched_targets() {
        let d = tiny_llama();
        let mut lora = LoraConfig::with_default_targets(Architecture::Bloom, 16, 32.0, 0.1);
        lora.use_rslora = true;
        assert_eq!(lora.scale(), 8.0);
        let err = lora.targets(&d).unwrap_err();
        assert!(
            err.to_string().contains("match no linear projection"),
            "{err}"
        );
        lora.target_modules = TargetModules::AllLinear;
        assert_eq!(lora.targets(&d).unwrap().len(), 14);
        lora.r = 0;
        assert!(lora.targets(&d).is_err());
    }

    #[test]
    fn peft_names() {
        let m = "transformer.h.0.self_attention.query_key_value";
        assert_eq!(
            peft_tensor_name(m, LoraMatrix::A, &PeftNaming::Saved),
            "base_model.model.transformer.h.0.self_attention.query_key_value.lora_A.weight"
        );
        assert_eq!(
            peft_tensor_name(m, LoraMatrix::B, &PeftNaming::Live("default".into())),
            "base_model.model.transformer.h.0.self_attention.query_key_value.lora_B.default.weight"
        );
        for (matrix, naming) in [
            (LoraMatrix::A, PeftNaming::Saved),
            (LoraMatrix::B, PeftNaming::Live("default".into())),
        ] {
            let name = peft_tensor_name(m, matrix, &naming);
            assert_eq!(parse_peft_tensor_name(&name), Some((m, matrix)));
        }
        assert_eq!(parse_peft_tensor_name("model.a.q_proj.lora_A.weight"), None);
        assert_eq!(
            parse_peft_tensor_name("base_model.model.a.q_proj.weight"),
            None
        );
    }
}
