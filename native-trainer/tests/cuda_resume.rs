//! `qlora train --device cuda` on the golden tiny BLOOM, killed once a checkpoint is written and
//! resumed with `--resume_from_checkpoint`, ends as the uninterrupted run does, in bf16 and in
//! f32; a CUDA checkpoint does not resume on the CPU.
//!
//! Every CUDA kernel of a training step is deterministic except the gradient norm's: its blocks
//! add their partial sums of squares into one f64 with `atomicAdd`, in whatever order they
//! finish. The norm may then differ in its last bits between two runs, and with it (rarely) the
//! f32 clipping factor. So the adapters, the AdamW moments and the losses are compared within a
//! relative 1e-3 (norm-wise per tensor), and whether they are bit-identical is printed.
//!
//! Skipped, with a printed reason, where no CUDA device opens.

use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use qlora_core::checkpoint::{SafetensorsFile, TensorSource};

mod common;
use common::{log_lines, stderr, Setup};

/// 20 examples in micro-batches of 4, two per step: 3 steps an epoch, 24 steps = 8 epochs;
/// dropout on; validation every 4 steps; a checkpoint every 4 steps, the newest 2 kept.
const FLAGS: &[&str] = &[
    "--max_steps",
    "24",
    "--lr",
    "2e-2",
    "--lora_r",
    "4",
    "--lora_dropout",
    "0.1",
    "--target_modules",
    "all-linear",
    "--batch_size",
    "4",
    "--gradient_steps",
    "2",
    "--warmup_steps",
    "2",
    "--eval_steps",
    "4",
    "--save_steps",
    "4",
    "--save_total_limit",
    "2",
];

/// Norm-wise relative difference allowed between the resumed and the uninterrupted run.
const TOLERANCE: f64 = 1e-3;

fn flags<'a>(device: &'a [&'a str], extra: &'a [&'a str]) -> Vec<&'a str> {
    FLAGS.iter().chain(device).chain(extra).copied().collect()
}

/// The step of the newest complete checkpoint in `dir`.
fn newest_checkpoint(dir: &Path) -> Option<usize> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let digits = name.strip_prefix("checkpoint-")?;
            digits
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| digits.parse().ok())?
        })
        .max()
}

/// Starts the run in `out` and kills it as soon as a checkpoint is there; returns the newest
/// checkpoint's step then, or `None` if the run finished first.
fn kill_after_a_checkpoint(setup: &Setup, out: &str, device: &[&str]) -> Option<usize> {
    let log = File::create(setup.dir.path().join(format!("{out}.stderr"))).unwrap();
    let mut child = setup
        .command("train.jsonl", out, &flags(device, &["--overwrite"]))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the qlora binary starts");
    let dir = setup.dir.path().join(out);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let err = std::fs::read_to_string(setup.dir.path().join(format!("{out}.stderr")));
            assert!(status.success(), "the run failed: {}", err.unwrap());
            return None;
        }
        if newest_checkpoint(&dir).is_some() {
            child.kill().unwrap();
            child.wait().unwrap();
            return (!dir.join("final").exists()).then(|| newest_checkpoint(&dir).unwrap());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `||a - b|| / ||b||` over the f32 tensor `name` of two safetensors files.
fn tensor_difference(a: &SafetensorsFile, b: &SafetensorsFile, name: &str) -> f64 {
    let (x, y) = (
        a.read(name).unwrap().to_f32().unwrap(),
        b.read(name).unwrap().to_f32().unwrap(),
    );
    assert_eq!(x.len(), y.len(), "{name}");
    let sq = |v: f64| v * v;
    let diff: f64 = x.iter().zip(&y).map(|(p, q)| sq(f64::from(p - q))).sum();
    let scale: f64 = y.iter().map(|q| sq(f64::from(*q))).sum();
    (diff / scale.max(f64::MIN_POSITIVE)).sqrt()
}

/// The worst [`tensor_difference`] over every tensor of `file` in two directories, and whether
/// the files are byte for byte the same.
fn file_difference(resumed: &Path, whole: &Path, file: &str) -> (f64, bool) {
    let (a, b) = (resumed.join(file), whole.join(file));
    let identical = std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap();
    let (a, b) = (
        SafetensorsFile::open(&a).unwrap(),
        SafetensorsFile::open(&b).unwrap(),
    );
    let names: Vec<String> = b.tensor_infos().into_iter().map(|i| i.name).collect();
    assert_eq!(a.tensor_infos().len(), names.len(), "{file}: tensor count");
    let worst = names
        .iter()
        .map(|name| tensor_difference(&a, &b, name))
        .fold(0.0, f64::max);
    (worst, identical)
}

#[test]
fn a_killed_cuda_run_resumes_to_the_uninterrupted_adapter() {
    if let Err(e) = qlora_trainer::cuda::Gpu::open(0) {
        eprintln!("skipped: {e}");
        return;
    }
    let setup = Setup::new();
    for precision in ["bf16", "f32"] {
        let device = ["--device", "cuda", "--precision", precision];
        let (whole, killed) = (format!("whole-{precision}"), format!("killed-{precision}"));
        let o = setup.train(&whole, &flags(&device, &[]));
        assert!(o.status.success(), "{}", stderr(&o));

        let killed_at = (0..3)
            .find_map(|_| kill_after_a_checkpoint(&setup, &killed, &device))
            .expect("a run was killed before it finished");
        if precision == "bf16" {
            // A CUDA checkpoint on the CPU would not continue the same computation.
            let cpu = ["--device", "cpu"];
            let o = setup.train(&killed, &flags(&cpu, &["--resume_from_checkpoint"]));
            let err = stderr(&o);
            assert!(
                !o.status.success()
                    && err.contains(
                        "CUDA precision (--device cuda, --precision) is (not set) now but was bf16"
                    ),
                "{err}"
            );
        }
        let o = setup.train(&killed, &flags(&device, &["--resume_from_checkpoint"]));
        assert!(o.status.success(), "{}", stderr(&o));

        let (resumed_dir, whole_dir) = (
            setup.dir.path().join(&killed),
            setup.dir.path().join(&whole),
        );
        let mut report = vec![format!("killed after checkpoint-{killed_at}")];
        for file in [
            "final/adapter_model.safetensors",
            "best_model/adapter_model.safetensors",
            "checkpoint-24/adapter_model.safetensors",
            "checkpoint-24/optimizer.safetensors",
        ] {
            let (difference, identical) = file_difference(&resumed_dir, &whole_dir, file);
            report.push(format!(
                "{file}: rel {difference:.1e}, bit-identical {identical}"
            ));
            assert!(
                difference <= TOLERANCE,
                "{precision} {file}: rel {difference}"
            );
        }
        let (resumed_log, whole_log) = (log_lines(&resumed_dir), log_lines(&whole_dir));
        let steps: Vec<u64> = resumed_log
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect();
        assert_eq!(
            steps,
            (1..=24).collect::<Vec<u64>>(),
            "every step logged once"
        );
        let worst_loss = resumed_log
            .iter()
            .zip(&whole_log)
            .map(|(r, w)| {
                let (r, w) = (r["loss"].as_f64().unwrap(), w["loss"].as_f64().unwrap());
                (r - w).abs() / w.abs()
            })
            .fold(0.0, f64::max);
        report.push(format!("losses: max rel {worst_loss:.1e}"));
        assert!(
            worst_loss <= TOLERANCE,
            "{precision}: loss rel {worst_loss}"
        );
        println!("{precision}: {}", report.join("; "));
    }
}
