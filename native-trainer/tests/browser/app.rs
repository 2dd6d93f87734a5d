//! The browser app, built.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::which;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("native-trainer sits in the workspace")
        .to_path_buf()
}

/// The built app's directory: `$QLORA_WEB_DIST` when set (scripts/test.sh builds it once with
/// `trunk build --release`), else a debug build made here with trunk (which needs no
/// wasm-opt), one at a time. `Err` says why there is none: trunk or wasm-bindgen missing. A
/// failing build panics: that is a broken app, not a missing tool.
pub fn dist() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("QLORA_WEB_DIST") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("index.html").is_file(),
            "QLORA_WEB_DIST={}: no index.html there",
            dir.display()
        );
        return Ok(dir);
    }
    let trunk = which("trunk")
        .ok_or("trunk is not installed (scripts/test.sh installs it: cargo install trunk)")?;
    which("wasm-bindgen").ok_or("wasm-bindgen (wasm-bindgen-cli 0.2.130) is not installed")?;
    let out = workspace().join("target/web-dist-test");
    // One build at a time: nextest runs each browser test in its own process.
    let lock = std::fs::File::create(workspace().join("target/web-dist-test.lock"))
        .expect("the build lock file");
    lock.lock().expect("the build lock");
    let status = Command::new(trunk)
        .args(["build", "--dist"])
        .arg(&out)
        .current_dir(workspace().join("web"))
        .status()
        .expect("trunk runs");
    assert!(status.success(), "trunk build of web/ failed");
    Ok(out)
}
