//! Run-time compilation of the CUDA C sources with NVRTC, for the device's architecture, with an
//! on-disk cache of the PTX (`~/.cache/qlora/kernels/<hash>.ptx`, keyed by the source, the
//! options and the architecture) so that later runs skip NVRTC.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use qlora_core::Result;

use crate::error;

/// Where `cuda_bf16.h` lives: `$CUDA_HOME/include`, `$CUDA_PATH/include`, or the default
/// toolkit location.
fn include_dir() -> String {
    ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("include"))
        .find(|p| p.join("cuda_bf16.h").exists())
        .unwrap_or_else(|| PathBuf::from("/usr/local/cuda/include"))
        .display()
        .to_string()
}

/// FNV-1a, 64 bits: stable across builds (std's hasher is not), which an on-disk key needs.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for &b in part.as_bytes().iter().chain([0u8].iter()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("QLORA_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("qlora").join("kernels"))
}

/// Writes `text` to `path` through a temporary file and a rename, so that a concurrent reader
/// never sees half a file.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        std::process::id(),
        fnv1a(&[&path.display().to_string()])
    ));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// NVRTC's options for `defines` (`NAME=value`).
fn options(defines: &[String]) -> Vec<String> {
    let mut options: Vec<String> = defines.iter().map(|d| format!("-D{d}")).collect();
    options.push("--std=c++17".into());
    options
}

/// PTX of `source` for `sm_<arch>` with `defines` (`NAME=value`), from the cache or NVRTC.
pub(crate) fn compile(source: &str, arch: u32, defines: &[String]) -> Result<Ptx> {
    let include = include_dir();
    let arch_name = format!("sm_{arch}");
    let options = options(defines);
    let key = fnv1a(
        &[source, &arch_name, &include]
            .into_iter()
            .chain(options.iter().map(String::as_str))
            .collect::<Vec<_>>(),
    );
    let cached = cache_dir().map(|d| d.join(format!("{key:016x}.ptx")));
    if let Some(path) = &cached {
        if let Ok(text) = std::fs::read_to_string(path) {
            return Ok(Ptx::from_src(text));
        }
    }
    let ptx = nvrtc(source, arch, options)?;
    if let Some(path) = &cached {
        // A cache that cannot be written only costs the next run a compilation.
        if let Err(e) = write_atomically(path, &ptx.to_src()) {
            eprintln!("note: kernel cache {} not written: {e}", path.display());
        }
    }
    Ok(ptx)
}

/// Compiles `source` with NVRTC (no cache).
fn nvrtc(source: &str, arch: u32, options: Vec<String>) -> Result<Ptx> {
    let include = include_dir();
    let arch_name = format!("sm_{arch}");
    // NVRTC wants a 'static arch string; one per architecture is leaked, once per process.
    let arch_static: &'static str = Box::leak(arch_name.clone().into_boxed_str());
    let opts = CompileOptions {
        arch: Some(arch_static),
        include_paths: vec![include.clone()],
        options,
        ..Default::default()
    };
    std::panic::catch_unwind(|| compile_ptx_with_opts(source, opts))
        .map_err(|_| error("NVRTC could not be loaded (libnvrtc.so): install the CUDA 13 runtime"))?
        .map_err(|e| {
            error(format!(
                "NVRTC failed to compile the kernels for {arch_name} (include path {include}): {e}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel compiles for Hopper in both precisions wherever NVRTC loads (no GPU needed:
    /// a CUDA C error shows up here, not first on the GPU machine). Skipped, saying why, where
    /// libnvrtc is missing.
    #[test]
    fn kernels_compile_with_nvrtc() {
        let source = crate::kernels::source();
        for t in ["float", "__nv_bfloat16"] {
            match nvrtc(&source, 90, options(&[format!("QLORA_T={t}")])) {
                Ok(ptx) => {
                    let ptx = ptx.to_src();
                    for name in crate::kernels::NAMES {
                        assert!(ptx.contains(&format!(".entry {name}(")), "{name} ({t})");
                    }
                }
                Err(e) if e.to_string().contains("could not be loaded") => {
                    eprintln!("skipped: {e}");
                    return;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn cache_key_depends_on_every_part() {
        assert_ne!(fnv1a(&["a", "bc"]), fnv1a(&["ab", "c"]));
        assert_eq!(fnv1a(&["x"]), fnv1a(&["x"]));
    }

    #[test]
    fn atomic_write_leaves_only_the_file() {
        let dir = std::env::temp_dir().join(format!("qlora-kc-{}", std::process::id()));
        let path = dir.join("k.ptx");
        write_atomically(&path, "ptx").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "ptx");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
