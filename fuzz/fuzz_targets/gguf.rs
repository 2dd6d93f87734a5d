//! A GGUF file: `gguf::parse_header`, then `Gguf::from_bytes` and `tensor_f32` of every tensor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlora_core::gguf::{self, Gguf};

fuzz_target!(|data: &[u8]| {
    let header = gguf::parse_header("fuzz.gguf", data);
    let Ok(file) = Gguf::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    assert!(
        header.is_ok(),
        "from_bytes accepted a header that parse_header refused"
    );
    for info in file.tensors() {
        if let Ok(values) = file.tensor_f32(&info.name) {
            assert_eq!(values.len() as u64, info.n_elements(), "{}", info.name);
        }
    }
});
