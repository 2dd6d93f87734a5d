//! `tokenizer.json` through `Tokenizer::from_tokenizer_json`, then a short encode and decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlora_core::tokenizer::{SpecialTokenNames, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let names = SpecialTokenNames {
        eos: Some("</s>".into()),
        ..SpecialTokenNames::default()
    };
    for names in [SpecialTokenNames::default(), names] {
        if let Ok(tokenizer) = Tokenizer::from_tokenizer_json("tokenizer.json", data, &names) {
            if let Ok(ids) = tokenizer.encode("hello world </s>", true) {
                let _ = tokenizer.decode(&ids, true);
            }
        }
    }
});
