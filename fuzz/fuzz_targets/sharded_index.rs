//! `ShardedCheckpoint::from_index`: the input is `index.json ++ [0] ++ shard.safetensors`; every
//! shard name the index gives opens that one shard (names with a `/` are refused, as a path
//! outside the directory would be). Then every tensor of the checkpoint is read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlora_core::checkpoint::{BoxedSource, SafetensorsFile, ShardedCheckpoint};
use qlora_core::Error;

fuzz_target!(|data: &[u8]| {
    let (index, shard) = qlora_fuzz::split_at_nul(data);
    let open_shard = |name: &str| -> qlora_core::Result<BoxedSource> {
        if name.contains('/') {
            return Err(Error::format(
                "index.json",
                format!("shard `{name}` is a path"),
            ));
        }
        Ok(Box::new(SafetensorsFile::from_bytes(name, shard.to_vec())?))
    };
    if let Ok(checkpoint) = ShardedCheckpoint::from_index("index.json", index, open_shard) {
        qlora_fuzz::read_every_tensor(&checkpoint);
    }
});
