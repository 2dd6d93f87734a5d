//! `TorchFile::from_bytes` (a torch.save zip with its pickle), then every tensor it lists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlora_core::checkpoint::TorchFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = TorchFile::from_bytes("fuzz.bin", data.to_vec()) {
        qlora_fuzz::read_every_tensor(&file);
    }
});
