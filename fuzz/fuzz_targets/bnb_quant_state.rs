//! The bitsandbytes `quant_state` JSON alone: the input is the JSON, put beside the other
//! tensors of a valid 4-bit layer (plain and double-quantized absmax, NF4 and FP4), then
//! deserialized and dequantized.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qlora_core::checkpoint::{bnb4bit, RawTensor, TensorInfo, TensorSource};
use qlora_core::quant::{self, FloatSlice, QuantType};
use qlora_core::{DType, Error, Result};

/// Tensors by name, held in memory.
struct Tensors(BTreeMap<String, RawTensor>);

impl TensorSource for Tensors {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.0
            .iter()
            .map(|(name, t)| TensorInfo {
                name: name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            })
            .collect()
    }
    fn read(&self, name: &str) -> Result<RawTensor> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| Error::tensor("layer", name, "no such tensor"))
    }
    fn file_of(&self, name: &str) -> Option<String> {
        self.0.contains_key(name).then(|| "layer".to_string())
    }
}

const WEIGHT: &str = "w";
const SHAPE: [usize; 2] = [8, 40];

/// The serialized tensors of `w` quantized every way, without their quant state.
fn layers() -> &'static [(QuantType, Tensors)] {
    static LAYERS: OnceLock<Vec<(QuantType, Tensors)>> = OnceLock::new();
    LAYERS.get_or_init(|| {
        let values: Vec<f32> = (0..SHAPE[0] * SHAPE[1])
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let mut out = Vec::new();
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for double_quant in [false, true] {
                let q =
                    quant::quantize_4bit(FloatSlice::F32(&values), &SHAPE, qt, 64, double_quant)
                        .expect("a valid layer");
                let tensors = bnb4bit::serialize(WEIGHT, &q)
                    .into_iter()
                    .filter(|(name, _)| !name.contains(".quant_state."))
                    .collect();
                out.push((qt, Tensors(tensors)));
            }
        }
        out
    })
}

fuzz_target!(|data: &[u8]| {
    for (qt, layer) in layers() {
        let mut tensors = Tensors(layer.0.clone());
        tensors.0.insert(
            format!("{WEIGHT}.quant_state.bitsandbytes__{}", qt.as_str()),
            RawTensor {
                dtype: DType::U8,
                shape: vec![data.len()],
                data: data.to_vec(),
            },
        );
        if let Ok(q) = bnb4bit::deserialize(&tensors, WEIGHT, *qt) {
            let _ = quant::dequantize_4bit(&q);
        }
    }
});
