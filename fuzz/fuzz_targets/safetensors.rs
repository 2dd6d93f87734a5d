//! `SafetensorsFile::from_bytes`, then every tensor it lists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlora_core::checkpoint::SafetensorsFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = SafetensorsFile::from_bytes("fuzz.safetensors", data.to_vec()) {
        qlora_fuzz::read_every_tensor(&file);
    }
});
