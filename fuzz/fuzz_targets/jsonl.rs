//! Training data through `data::parse_jsonl` and `parse_jsonl_skipping_bad_lines`, with and
//! without a history column.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlora_core::data::{parse_jsonl, parse_jsonl_skipping_bad_lines, Columns};

fuzz_target!(|data: &[u8]| {
    let with_history = Columns {
        history: Some("history".into()),
        ..Columns::default()
    };
    for columns in [Columns::default(), with_history] {
        let _ = parse_jsonl("train.jsonl", data, &columns);
        let _ = parse_jsonl_skipping_bad_lines("train.jsonl", data, &columns);
    }
});
