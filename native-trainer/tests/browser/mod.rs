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
