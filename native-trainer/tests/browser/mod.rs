//! What a browser test needs, with no async runtime: a static file server on 127.0.0.1, a
//! minimal WebDriver client for chromedriver, and the app built with trunk.

pub mod app;
pub mod server;
pub mod webdriver;

/// `name` on PATH.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Writes a screenshot to target/artifacts/`name`.
pub fn save_artifact(name: &str, png: &[u8]) -> std::path::PathBuf {
    let dir = app::workspace().join("target/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, png).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{}: not a PNG", path.display());
    path
}

/// Chromium and chromedriver, or why they are missing.
pub fn tools() -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    let chromium = ["chromium", "chromium-browser"]
        .iter()
        .find_map(|n| which(n))
        .ok_or("chromium is not installed (apt-get install chromium)")?;
    let driver = which("chromedriver")
        .ok_or("chromedriver is not installed (apt-get install chromium-driver)")?;
    Ok((chromium, driver))
}
