//! `config.json` through `ModelConfig::parse`, then `describe()` and the tensor list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlora_core::arch::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = ModelConfig::parse(text, "config.json") {
        let description = config.describe();
        let _ = description.tensors();
        let _ = description.linears();
    }
});
