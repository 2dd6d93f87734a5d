//! `qlora train` killed with SIGKILL at random moments (and once while a checkpoint is being
//! written), resumed with `--resume_from_checkpoint` until it finishes: the final and best
//! adapters are byte for byte those of an uninterrupted run, and the log has every step once.
//! Linux only: signals and `/proc`.
#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

mod common;
use common::{log_lines, Setup};

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

fn spawn(setup: &Setup, out: &str, extra: &[&str], stderr: Stdio) -> Child {
    let flags: Vec<&str> = FLAGS.iter().chain(extra).copied().collect();
    setup
        .command("train.jsonl", out, &flags)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("the qlora binary starts")
}

/// Starts or continues the run in `out`: resumes when a checkpoint is there, else starts over.
/// Also returns the step it starts from.
fn spawn_next(setup: &Setup, out: &str, stderr: Stdio) -> (Child, usize) {
    match newest_checkpoint(&setup.dir.path().join(out)) {
        Some(step) => (
            spawn(setup, out, &["--resume_from_checkpoint"], stderr),
            step,
        ),
        None => (spawn(setup, out, &["--overwrite"], stderr), 0),
    }
}

/// The step of the newest complete checkpoint in `dir`.
fn newest_checkpoint(dir: &Path) -> Option<usize> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let digits = name.strip_prefix("checkpoint-")?;
            digits
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| digits.parse().ok())?
        })
        .max()
}

/// The steps a training process reports on its (piped) stderr as it finishes them
/// (`step 3/8: loss ...`, or `step 3: validation loss ...`); the channel closes when it exits.
fn reported_steps(child: &mut Child) -> mpsc::Receiver<usize> {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(step) = step_of(&line) {
                // The receiver may be gone once the test has what it waited for.
                let _ = send.send(step);
            }
        }
    });
    receive
}

fn step_of(line: &str) -> Option<usize> {
    let rest = &line[line.find(" step ")? + " step ".len()..];
    let end = rest.find(['/', ':'])?;
    rest[..end].parse().ok()
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
    let (mut child, _) = spawn_next(setup, out, Stdio::null());
    let pid = child.id();
    let dir = setup.dir.path().join(out);
    while child.try_wait().unwrap().is_none() {
        // Only once a complete checkpoint is there to resume from.
        if checkpoint_in_progress(&dir, pid).is_none() || newest_checkpoint(&dir).is_none() {
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
    // The uninterrupted run, timed: the random kills below wait fractions of its step time.
    let mut whole = spawn(&setup, "whole", &[], Stdio::piped());
    let reports: Vec<Instant> = reported_steps(&mut whole)
        .iter()
        .map(|_| Instant::now())
        .collect();
    assert!(
        whole.wait().unwrap().success(),
        "the uninterrupted run failed"
    );
    let step_time = (reports[reports.len() - 1] - reports[0]) / (reports.len() - 1) as u32;

    // First a kill while a checkpoint is being written (after an earlier one is complete): it
    // leaves the checkpoint's temporary directory, which the resumed run removes.
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

    // Then five attempts killed at random moments, seeded: each runs until it reports one of its
    // first two steps (but not the 8th), then a random 0 to 1 step time more (into the next step
    // or its checkpoint), and is killed; each continues from the newest checkpoint (or starts
    // over if there is none yet). Then a last one finishes.
    let mut rng = StdRng::seed_from_u64(8);
    // (step started from, step reported, further delay) of each kill.
    let mut kills = Vec::new();
    for _ in 0..5 {
        let (mut child, from) = spawn_next(&setup, "killed", Stdio::piped());
        if from >= 7 {
            // An earlier attempt outran its kill (a loaded machine) and finished: nothing is
            // left to kill, and the resumed run ends at once.
            assert!(child.wait().unwrap().success(), "a resumed run failed");
            break;
        }
        let steps = reported_steps(&mut child);
        let target = rng.random_range(from + 1..=(from + 2).min(7));
        let extra = step_time.mul_f64(rng.random_range(0.0..1.0));
        while steps.recv().is_ok_and(|step| step < target) {}
        std::thread::sleep(extra);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills.push((from, target, extra.as_millis()));
        }
        assert!(
            child.wait().unwrap().code() != Some(1),
            "a resumed run failed"
        );
        assert!(!dir.join(&torn).exists(), "{torn} was left behind");
    }
    let (last, _) = spawn_next(&setup, "killed", Stdio::null());
    assert!(last.wait_with_output().unwrap().status.success());
    eprintln!("killed while writing {torn}, then (from step, after step, + ms): {kills:?}");
    assert!(kills.len() >= 4, "only {} kills", kills.len());

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
