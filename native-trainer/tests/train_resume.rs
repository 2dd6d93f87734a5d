//! `qlora train` killed with SIGKILL at random moments (and once while a checkpoint is being
//! written), resumed with `--resume_from_checkpoint` until it finishes: the final and best
//! adapters are byte for byte those of an uninterrupted run, and the log has every step once.
//! Linux only: signals and `/proc`.
#![cfg(target_os = "linux")]

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

mod common;
use common::{log_lines, stderr, Setup};

/// 20 examples in micro-batches of 4, two per step: 3 steps an epoch (the last of one
/// micro-batch), 8 steps = 2.67 epochs; dropout on; validation every 3 steps; checkpoints every
/// 2 steps (at 6 an epoch ends, the others are mid-epoch), only the newest 2 kept.
const FLAGS: &[&str] = &[
    "--max_steps",
    "8",
    "--lr",
    "2e-2",
    "--lora_r",
    "4",
    "--lora_dropout",
    "0.1",
    "--batch_size",
    "4",
    "--gradient_steps",
    "2",
    "--warmup_steps",
    "2",
    "--eval_steps",
    "3",
    "--save_steps",
    "2",
    "--save_total_limit",
    "2",
];

fn spawn(setup: &Setup, out: &str, extra: &[&str]) -> Child {
    let flags: Vec<&str> = FLAGS.iter().chain(extra).copied().collect();
    setup
        .command("train.jsonl", out, &flags)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the qlora binary starts")
}

/// Starts or continues the run in `out`: resumes when a checkpoint is there, else starts over.
fn spawn_next(setup: &Setup, out: &str) -> Child {
    let dir = setup.dir.path().join(out);
    let has_checkpoint = dir.is_dir()
        && std::fs::read_dir(&dir)
            .unwrap()
            .any(|e| is_checkpoint(&e.unwrap().file_name().to_string_lossy()));
    if has_checkpoint {
        spawn(setup, out, &["--resume_from_checkpoint"])
    } else {
        spawn(setup, out, &["--overwrite"])
    }
}

fn is_checkpoint(name: &str) -> bool {
    name.strip_prefix("checkpoint-")
        .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a live child's pid; no memory is involved.
    let sent = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(sent, 0, "kill({pid}, {signal})");
}

/// Waits until the process is stopped (SIGSTOP is delivered asynchronously).
fn wait_stopped(pid: u32) {
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Field 3, after the parenthesized command name.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if matches!(state, Some('T' | 't' | 'Z') | None) {
            return;
        }
        std::thread::yield_now();
    }
}

/// The name of a checkpoint's temporary directory that process `pid` has in `dir`.
fn checkpoint_in_progress(dir: &Path, pid: u32) -> Option<String> {
    let suffix = format!(".tmp-{pid}");
    std::fs::read_dir(dir).ok()?.find_map(|e| {
        let name = e.ok()?.file_name().into_string().ok()?;
        (name.starts_with("checkpoint-") && name.ends_with(&suffix)).then_some(name)
    })
}

/// Runs the next attempt in `out`, watching for a checkpoint's temporary directory; once one
/// appears, stops the process (SIGSTOP) and, if the directory is still there, so that the
/// checkpoint is provably unfinished, kills it (SIGKILL) and returns the directory's name.
/// `None` if the run finished first.
fn kill_while_saving(setup: &Setup, out: &str) -> Option<String> {
    let mut child = spawn_next(setup, out);
    let pid = child.id();
    let dir = setup.dir.path().join(out);
    while child.try_wait().unwrap().is_none() {
        if checkpoint_in_progress(&dir, pid).is_none() {
            // Far shorter than writing a checkpoint, which syncs several files.
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        signal(pid, libc::SIGSTOP);
        wait_stopped(pid);
        if let Some(name) = checkpoint_in_progress(&dir, pid) {
            child.kill().unwrap();
            child.wait().unwrap();
            return Some(name);
        }
        signal(pid, libc::SIGCONT);
    }
    None
}

fn logged_steps(log: &Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |t| t.lines().count())
}

fn file(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
}

/// The log's (step, loss, val_loss) as written, so that equal text means equal bits.
fn curve(dir: &Path) -> Vec<(u64, String, String)> {
    log_lines(dir)
        .iter()
        .map(|l: &Value| {
            (
                l["step"].as_u64().unwrap(),
                l["loss"].to_string(),
                l["val_loss"].to_string(),
            )
        })
        .collect()
}

#[test]
fn killed_and_resumed_runs_end_with_the_uninterrupted_adapter_bytes() {
    let setup = Setup::new();
    let whole = setup.train_on("train.jsonl", "whole", FLAGS);
    assert!(whole.status.success(), "{}", stderr(&whole));

    // Kills at random steps, seeded: each attempt runs until its log reaches a random step,
    // then a random few milliseconds more, and is killed; the next continues from the newest
    // checkpoint (or starts over if there is none yet).
    let mut rng = StdRng::seed_from_u64(8);
    let mut kills = 0;
    for _ in 0..6 {
        let mut child = spawn_next(&setup, "killed");
        let target = rng.random_range(1..=8);
        let extra = Duration::from_millis(rng.random_range(0..40));
        let log = setup.dir.path().join("killed/train_log.jsonl");
        while child.try_wait().unwrap().is_none() && logged_steps(&log) < target {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(extra);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    // A kill while a checkpoint is being written leaves its temporary directory, which the
    // next run removes; the finished checkpoints are untouched.
    let mut torn = None;
    for _ in 0..3 {
        torn = kill_while_saving(&setup, "killed");
        if torn.is_some() {
            break;
        }
        // The run finished before it was caught writing a checkpoint: train again.
        std::fs::remove_dir_all(setup.dir.path().join("killed")).unwrap();
    }
    let torn = torn.expect("a run was caught writing a checkpoint");
    let dir = setup.dir.path().join("killed");
    assert!(dir.join(&torn).is_dir(), "{torn}");
    let done = spawn_next(&setup, "killed").wait_with_output().unwrap();
    assert!(done.status.success());
    assert!(!dir.join(&torn).exists(), "{torn} was left behind");
    eprintln!("{kills} random kills, then one while writing {torn}");
    assert!(
        kills >= 3,
        "only {kills} of the runs were killed before they ended"
    );

    let whole_dir = setup.dir.path().join("whole");
    for name in [
        "final/adapter_model.safetensors",
        "final/adapter_config.json",
        "best_model/adapter_model.safetensors",
        "checkpoint-8/adapter_model.safetensors",
        "checkpoint-8/optimizer.safetensors",
    ] {
        assert!(
            file(&whole_dir, name) == file(&dir, name),
            "{name} differs from the uninterrupted run's"
        );
    }
    assert_eq!(curve(&dir), curve(&whole_dir));
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "best_model",
            "checkpoint-6",
            "checkpoint-8",
            "final",
            "train_log.jsonl"
        ]
    );
}
