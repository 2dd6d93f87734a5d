//! What the fuzz targets share: splitting one input into two files, and reading every tensor a
//! parsed checkpoint lists (reading is where a lying header turns into an allocation or a slice).

use qlora_core::checkpoint::TensorSource;

/// Splits a two-file input at its first NUL byte: `(first, rest)`. A JSON or text file has no
/// NUL of its own, so the seeds are `config.json ++ [0] ++ weights`. Without a NUL, the second
/// file is empty.
pub fn split_at_nul(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[]),
    }
}

/// Reads every tensor `source` lists, checking that a successful read has the bytes its dtype
/// and shape promise.
pub fn read_every_tensor(source: &dyn TensorSource) {
    for info in source.tensor_infos() {
        if let Ok(t) = source.read(&info.name) {
            assert_eq!(
                t.dtype, info.dtype,
                "{}: dtype differs from tensor_infos",
                info.name
            );
            assert_eq!(
                t.shape, info.shape,
                "{}: shape differs from tensor_infos",
                info.name
            );
            assert_eq!(
                t.data.len(),
                info.numel() * info.dtype.size_in_bytes(),
                "{}: data length differs from its shape",
                info.name
            );
        }
    }
}
