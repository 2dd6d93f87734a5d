//! A bitsandbytes 4-bit checkpoint (safetensors) through `Dequantizing`: every tensor it lists
//! is read (quantized weights dequantized), and every quantized weight deserialized.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlora_core::checkpoint::bnb4bit::Dequantizing;
use qlora_core::checkpoint::{SafetensorsFile, TensorSource};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = SafetensorsFile::from_bytes("fuzz-4bit.safetensors", data.to_vec()) else {
        return;
    };
    let model = Dequantizing::new(file);
    qlora_fuzz::read_every_tensor(&model);
    for info in model.inner().tensor_infos() {
        if let Some(Ok(q)) = model.quantized(&info.name) {
            let _ = qlora_core::quant::dequantize_4bit(&q);
        }
    }
});
