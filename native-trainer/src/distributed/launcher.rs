//! `--nproc_per_node N`: one child process per GPU of this host, each the same command with the
//! variables torchrun would set (RANK = LOCAL_RANK, WORLD_SIZE = N, MASTER_ADDR = 127.0.0.1, a
//! free MASTER_PORT). Their output lines come back prefixed with `[rank r]`; when one child
//! fails the others are killed and the error names that rank and its last error line.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::DistributedError;

/// How often the launcher looks at its children.
const POLL: Duration = Duration::from_millis(50);

/// Which output of a child a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Where the children's output lines go.
pub trait OutputSink: Send + Sync {
    fn line(&self, rank: usize, stream: Stream, text: &str);
}

/// The launcher's own stdout and stderr, each line prefixed with its rank.
pub struct PrefixedTerminal;

impl OutputSink for PrefixedTerminal {
    fn line(&self, rank: usize, stream: Stream, text: &str) {
        match stream {
            Stream::Stdout => println!("[rank {rank}] {text}"),
            Stream::Stderr => eprintln!("[rank {rank}] {text}"),
        }
    }
}

/// A port nobody listens on now (the OS picks it; a race with another program taking it
/// before rank 0 does is possible and then reported by the rendezvous).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// This process's arguments without `flag` and its value (`--flag N` or `--flag=N`): what the
/// children of a launcher run.
pub fn args_without(args: impl IntoIterator<Item = OsString>, flag: &str) -> Vec<OsString> {
    let with_value = format!("{flag}=");
    let mut kept = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == flag {
            args.next();
        } else if !text.starts_with(&with_value) {
            kept.push(arg);
        }
    }
    kept
}

/// This process's arguments less the launcher's `flag`, as one string: what every rank of a run
/// must share (the rendezvous refuses a rank started with other arguments).
pub fn rank_arguments(flag: &str) -> String {
    args_without(std::env::args_os().skip(1), flag)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `--nproc_per_node N` (named `flag`) of this very program: runs it `nproc` times with the
/// same arguments less `flag`, as the ranks of one data-parallel run on this host. Refused
/// inside a rank (RANK already set: torchrun or a launcher started this process).
pub fn launch_this_program(nproc: usize, flag: &str) -> Result<(), DistributedError> {
    if nproc == 0 {
        return Err(DistributedError::Launch("must be at least 1".into()));
    }
    if std::env::var_os("RANK").is_some() {
        return Err(DistributedError::Launch(format!(
            "RANK is set: this process is already one rank of a data-parallel run (torchrun); \
             leave {flag} out there"
        )));
    }
    let program = std::env::current_exe()
        .map_err(|e| DistributedError::Launch(format!("finding this program: {e}")))?;
    let args = args_without(std::env::args_os().skip(1), flag);
    let command = || {
        let mut c = Command::new(&program);
        c.args(&args);
        c
    };
    launch(nproc, &command, Arc::new(PrefixedTerminal))
}

/// One running child, its output forwarders, and the last error line it printed.
struct Rank {
    child: Child,
    forwarders: Vec<JoinHandle<()>>,
    last_error: Arc<Mutex<Option<String>>>,
}

/// Runs `nproc` children of `command` (made afresh for each), as ranks 0..nproc of one
/// data-parallel run on this host, until all succeed or one fails; a failure kills the rest.
pub fn launch(
    nproc: usize,
    command: &dyn Fn() -> Command,
    sink: Arc<dyn OutputSink>,
) -> Result<(), DistributedError> {
    let port =
        free_port().map_err(|e| DistributedError::Launch(format!("finding a free port: {e}")))?;
    let mut ranks: Vec<Option<Rank>> = Vec::new();
    for rank in 0..nproc {
        match spawn_rank(rank, nproc, port, command(), sink.clone()) {
            Ok(r) => ranks.push(Some(r)),
            Err(e) => {
                stop_all(&mut ranks);
                return Err(DistributedError::Launch(format!(
                    "starting rank {rank}: {e}"
                )));
            }
        }
    }
    loop {
        let mut running = 0;
        for rank in 0..nproc {
            let Some(r) = ranks[rank].as_mut() else {
                continue;
            };
            match r.child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) if status.success() => {
                    finish(ranks[rank].take());
                }
                Ok(Some(status)) => {
                    let failed = ranks[rank].take();
                    stop_all(&mut ranks);
                    let error = finish(failed);
                    return Err(DistributedError::RankFailed {
                        rank,
                        status: describe(status),
                        error: error.unwrap_or_else(|| "no error message".into()),
                    });
                }
                Err(e) => {
                    stop_all(&mut ranks);
                    return Err(DistributedError::Launch(format!(
                        "waiting for rank {rank}: {e}"
                    )));
                }
            }
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

fn spawn_rank(
    rank: usize,
    nproc: usize,
    port: u16,
    mut command: Command,
    sink: Arc<dyn OutputSink>,
) -> std::io::Result<Rank> {
    command
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", nproc.to_string())
        .env("LOCAL_WORLD_SIZE", nproc.to_string())
        .env("MASTER_ADDR", Ipv4Addr::LOCALHOST.to_string())
        .env("MASTER_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    let last_error = Arc::new(Mutex::new(None));
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let forwarders = vec![
        forward(rank, Stream::Stdout, stdout, sink.clone(), None),
        forward(rank, Stream::Stderr, stderr, sink, Some(last_error.clone())),
    ];
    Ok(Rank {
        child,
        forwarders,
        last_error,
    })
}

/// Passes `output`'s lines to `sink`; on stderr also keeps the last line that reads as an
/// error (`error: ...` as `qlora` prints it, or a panic), else the last line.
fn forward(
    rank: usize,
    stream: Stream,
    output: impl Read + Send + 'static,
    sink: Arc<dyn OutputSink>,
    last_error: Option<Arc<Mutex<Option<String>>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(output);
        let mut line = Vec::new();
        let mut saw_error = false;
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line);
            // A progress bar redraws its line with carriage returns: show the newest state.
            let text = text
                .trim_end()
                .rsplit('\r')
                .next()
                .unwrap_or("")
                .to_string();
            if let Some(last) = &last_error {
                let is_error = text.starts_with("error") || text.contains("panicked at");
                if !text.is_empty() && (is_error || !saw_error) {
                    saw_error |= is_error;
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(text.clone());
                }
            }
            sink.line(rank, stream, &text);
            line.clear();
        }
    })
}

/// Waits for a child's forwarders (its output is complete) and returns its last error line.
fn finish(rank: Option<Rank>) -> Option<String> {
    let rank = rank?;
    for forwarder in rank.forwarders {
        let _ = forwarder.join();
    }
    let last = rank
        .last_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    last
}

/// Kills every child still running and waits for it. Its forwarders are left to end on their
/// own: a process the child started may still hold its output open.
fn stop_all(ranks: &mut [Option<Rank>]) {
    for rank in ranks.iter_mut() {
        if let Some(mut r) = rank.take() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Collects the lines instead of printing them.
    #[derive(Default)]
    struct Collected(Mutex<Vec<(usize, Stream, String)>>);

    impl OutputSink for Collected {
        fn line(&self, rank: usize, stream: Stream, text: &str) {
            self.0
                .lock()
                .unwrap()
                .push((rank, stream, text.to_string()));
        }
    }

    fn shell(script: &'static str) -> impl Fn() -> Command {
        move || {
            let mut c = Command::new("sh");
            c.arg("-c").arg(script);
            c
        }
    }

    #[test]
    fn children_get_the_torchrun_variables_and_their_output_is_prefixed() {
        let sink = Arc::new(Collected::default());
        let script =
            "echo \"$RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT\"; echo note >&2";
        launch(3, &shell(script), sink.clone()).unwrap();
        let lines = sink.0.lock().unwrap().clone();
        let mut ports = Vec::new();
        for rank in 0..3 {
            let out: Vec<&String> = lines
                .iter()
                .filter(|(r, s, _)| *r == rank && *s == Stream::Stdout)
                .map(|(_, _, t)| t)
                .collect();
            let fields: Vec<&str> = out[0].split(' ').collect();
            assert_eq!(
                fields[..4],
                [&*rank.to_string(), &*rank.to_string(), "3", "127.0.0.1"]
            );
            ports.push(fields[4].to_string());
            assert!(lines.contains(&(rank, Stream::Stderr, "note".into())));
        }
        assert!(ports
            .iter()
            .all(|p| *p == ports[0] && p.parse::<u16>().is_ok()));
    }

    #[test]
    fn a_failing_child_stops_the_others_and_is_named() {
        let sink = Arc::new(Collected::default());
        // Rank 1 fails at once; the others would run for a minute.
        let script = "if [ \"$RANK\" = 1 ]; then echo 'loading' >&2; \
                      echo 'error: CUDA device 1 does not exist' >&2; echo 'bye' >&2; exit 3; fi; \
                      exec sleep 60";
        let started = Instant::now();
        let e = launch(3, &shell(script), sink).unwrap_err().to_string();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the others were not stopped"
        );
        assert!(
            e.contains("rank 1")
                && e.contains("exit code 3")
                && e.contains("CUDA device 1 does not exist"),
            "{e}"
        );
    }

    #[test]
    fn the_launcher_flag_is_removed_from_the_childrens_arguments() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        let kept = args_without(
            args(&[
                "train",
                "--nproc_per_node",
                "4",
                "--lr",
                "1e-4",
                "--nproc_per_node=2",
            ]),
            "--nproc_per_node",
        );
        assert_eq!(kept, args(&["train", "--lr", "1e-4"]));
    }
}
