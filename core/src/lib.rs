//! qlora-core: the formats and the math, with no GPU and no OS assumptions beyond `std`
//! (it builds for `wasm32-unknown-unknown`; file-system helpers are native-only).

pub mod checkpoint;
pub mod dtype;
pub mod error;

pub use dtype::DType;
pub use error::{Error, Result};
pub mod data;
pub mod gguf;
pub mod prompt;
pub mod tokenizer;
