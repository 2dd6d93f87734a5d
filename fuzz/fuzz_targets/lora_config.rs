//! `adapter_config.json` through `LoraConfig::from_json`, and back through `to_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlora_core::peft::LoraConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = LoraConfig::from_json("adapter_config.json", text) {
        let _ = config.scale();
        LoraConfig::from_json("adapter_config.json", &config.to_json())
            .expect("a config qlora wrote reads back");
    }
});
