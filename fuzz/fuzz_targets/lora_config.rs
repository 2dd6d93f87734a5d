//! `adapter_config.json` through `AdapterConfig::from_json`, and back through `to_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlora_core::peft::AdapterConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = AdapterConfig::from_json("adapter_config.json", text) {
        let _ = config.lora.scale();
        let back = AdapterConfig::from_json("adapter_config.json", &config.to_json())
            .expect("a config qlora wrote reads back");
        assert_eq!(back, config, "a config reads back as it was");
    }
});
