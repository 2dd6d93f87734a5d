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

    /// ptxas' report (`--verbose`) on compiling `source` for sm_90 in bf16, the precision of
    /// GPU training and generation; `None` where libnvrtc is missing.
    fn ptxas_report(source: &str) -> Option<String> {
        use cudarc::nvrtc::result;
        let source = std::ffi::CString::new(source).unwrap();
        // The first call into NVRTC panics where the library cannot be loaded.
        let prog = std::panic::catch_unwind(|| result::create_program(&source, None)).ok()?;
        let prog = prog.unwrap();
        let mut opts = options(&["QLORA_T=__nv_bfloat16".into()]);
        opts.push(format!("--include-path={}", include_dir()));
        opts.push("--gpu-architecture=sm_90".into());
        opts.push("--ptxas-options=--verbose".into());
        // SAFETY: `prog` was created above and is destroyed only after its last use.
        let log = unsafe {
            let compiled = result::compile_program(prog, &opts);
            let log = result::get_program_log(prog).unwrap();
            result::destroy_program(prog).unwrap();
            let log: Vec<u8> = log
                .iter()
                .map(|&c| c as u8)
                .take_while(|&c| c != 0)
                .collect();
            let log = String::from_utf8_lossy(&log).into_owned();
            compiled.unwrap_or_else(|e| panic!("{e}: {log}"));
            log
        };
        Some(log)
    }

    /// A kernel's resources as ptxas reports them: registers and bytes spilled (stored + loaded).
    fn resources(report: &str) -> Vec<(String, usize, usize)> {
        let number_before = |text: &str, unit: &str| -> usize {
            let end = text
                .find(unit)
                .unwrap_or_else(|| panic!("no '{unit}' in {text}"));
            let digits = text[..end].trim_end();
            let start = digits
                .rfind(|c: char| !c.is_ascii_digit())
                .map_or(0, |i| i + 1);
            digits[start..].parse().unwrap()
        };
        report
            .split("Compiling entry function '")
            .skip(1)
            .map(|entry| {
                let name = entry[..entry.find('\'').unwrap()].to_string();
                let registers = number_before(entry, "registers");
                let spilled = number_before(entry, "bytes spill stores")
                    + number_before(entry, "bytes spill loads");
                (name, registers, spilled)
            })
            .collect()
    }

    /// No kernel spills registers to local memory in bf16: spills would put loads on the data
    /// path that bounds the decoding GEMV (held to 64 registers by its launch bounds, two blocks
    /// of sixteen warps an SM) and every kernel that keeps a row in registers. Skipped, saying
    /// why, where libnvrtc is missing.
    #[test]
    fn no_kernel_spills_registers() {
        let Some(report) = ptxas_report(&crate::kernels::source()) else {
            eprintln!("skipped: NVRTC could not be loaded");
            return;
        };
        let kernels = resources(&report);
        for name in crate::kernels::NAMES {
            assert!(
                kernels.iter().any(|(k, ..)| k == name),
                "{name} not in ptxas' report"
            );
        }
        for (name, registers, spilled) in &kernels {
            assert_eq!(
                *spilled, 0,
                "{name} spills {spilled} bytes ({registers} registers)"
            );
        }
        let (_, tc_registers, _) = kernels
            .iter()
            .find(|(k, ..)| k == "gemv_4bit_tc_dq")
            .unwrap();
        assert!(
            *tc_registers <= 64,
            "gemv_4bit_tc_dq: {tc_registers} registers"
        );
    }

    #[test]
    fn resources_are_read_from_the_report() {
        let report = "ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
            ptxas info    : Function properties for k\n\
            ptxas         .     0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 64 registers, used 1 barriers, 40960 bytes smem\n";
        assert_eq!(resources(report), vec![("k".to_string(), 64, 20)]);
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
