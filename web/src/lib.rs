//! The qlora browser app (Leptos, client-side, built with trunk): a chat page (the WGSL engine
//! brings it) and the quantization inspector. The modules outside `ui` are plain Rust, tested
//! natively: which files to load, opening them as a checkpoint, the CSV export. `ui` is the app
//! and exists only in the browser (wasm32).

pub mod chat_model;
pub mod checkpoint;
pub mod csv;
pub mod files;
#[cfg(target_arch = "wasm32")]
pub mod ui;
