//! qlora-core: the formats and the math, with no GPU and no OS assumptions beyond `std`
//! (it builds for `wasm32-unknown-unknown`; file-system helpers are native-only).

pub mod arch;
pub mod checkpoint;
pub mod data;
#[cfg(not(target_arch = "wasm32"))]
pub mod demo;
pub mod dtype;
pub mod error;
#[cfg(not(target_arch = "wasm32"))]
pub mod fsutil;
pub mod gguf;
pub mod inspect;
pub mod metrics;
pub mod peft;
pub mod prompt;
pub mod pyjson;
pub mod quant;
pub mod response;
pub mod tokenizer;

pub use dtype::DType;
pub use error::{Error, Result};
