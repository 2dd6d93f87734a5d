//! A whole PEFT adapter through `LoraAdapter::from_bytes`: the input is
//! `adapter_config.json ++ [0] ++ adapter_model.safetensors`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlora_core::peft::LoraAdapter;

fuzz_target!(|data: &[u8]| {
    let (config, weights) = qlora_fuzz::split_at_nul(data);
    let Ok(config) = std::str::from_utf8(config) else {
        return;
    };
    if let Ok(adapter) = LoraAdapter::from_bytes(config, weights.to_vec()) {
        let _ = adapter.num_parameters();
        let _ = adapter.tensors();
    }
});
