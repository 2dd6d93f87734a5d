//! Shared helpers of the cross-crate tests: where the fixtures and the golden data live.

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

/// The demo GGUF (see `qlora_core::demo`), or `None` with the reason printed where it is absent.
pub fn demo_gguf() -> Option<PathBuf> {
    let Some(path) = qlora_core::demo::demo_gguf_path() else {
        eprintln!("skipped: neither QLORA_DEMO_GGUF, QLORA_CACHE nor HOME is set");
        return None;
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
