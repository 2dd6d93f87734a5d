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
