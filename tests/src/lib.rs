//! Shared helpers of the cross-crate tests: where the fixtures, the golden data and the demo model
//! live.

use std::path::PathBuf;

/// `tests/fixtures/`, the small golden files copied into the repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// `../shared/golden` beside the checkout, where CI has the large golden files; `None` (with a
/// printed reason) where it is absent, so a test can skip.
pub fn shared_golden() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipped: {} is absent", p.display());
        None
    }
}

/// The file name of the demo base model, as `scripts/fetch-demo-model.sh` stores it.
pub const DEMO_GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$QLORA_DEMO_GGUF`, else `${QLORA_CACHE:-$HOME/.cache/qlora}/SmolLM2-135M-Instruct.Q4_1.gguf`;
/// `None` (with the reason printed) where the file is not there.
pub fn demo_gguf() -> Option<PathBuf> {
    let path = match std::env::var_os("QLORA_DEMO_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("QLORA_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/qlora"))
                });
            match cache {
                Some(dir) => dir.join(DEMO_GGUF_NAME),
                None => {
                    eprintln!("skipped: neither QLORA_DEMO_GGUF, QLORA_CACHE nor HOME is set");
                    return None;
                }
            }
        }
    };
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipped: {} is absent (run scripts/fetch-demo-model.sh)",
            path.display()
        );
        None
    }
}
