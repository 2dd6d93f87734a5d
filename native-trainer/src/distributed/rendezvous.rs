//! The rendezvous of a data-parallel run: rank 0 listens at MASTER_PORT, every other rank
//! connects to MASTER_ADDR:MASTER_PORT and says who it is, and once all have come rank 0 hands
//! each the same bytes (NCCL's unique id). Plain TCP (std::net), every wait bounded by a
//! timeout whose message names the address. Ranks also compare a digest of their arguments, so
//! that processes started with different flags stop here instead of hanging later.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::env::RankEnv;
use super::DistributedError;

/// What opens every message: protocol and version.
const MAGIC: &[u8; 8] = b"QLORADP1";
/// Pause between attempts to reach rank 0, which may not listen yet.
const RETRY: Duration = Duration::from_millis(200);
/// The longest payload, identity or error message accepted.
const MAX_FIELD: u32 = 1 << 20;

/// Meets the other ranks of `env`'s run: rank 0 returns `payload` once every rank has come and
/// received it; the others return what rank 0 sent. `identity` must be the same on every rank
/// (a digest of the arguments). Fails after `timeout` with the address and who is missing.
pub fn rendezvous(
    env: &RankEnv,
    identity: &str,
    payload: impl FnOnce() -> Result<Vec<u8>, DistributedError>,
    timeout: Duration,
) -> Result<Vec<u8>, DistributedError> {
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        let listener =
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, env.master_port)).map_err(|e| {
                failed(
                    env,
                    format!("rank 0 cannot listen on port {}: {e}", env.master_port),
                )
            })?;
        serve(env, &listener, identity, &payload()?, deadline, timeout)
    } else {
        join(env, identity, deadline, timeout)
    }
}

fn failed(env: &RankEnv, msg: String) -> DistributedError {
    DistributedError::Rendezvous {
        master: env.master(),
        msg,
    }
}

/// Rank 0: waits for every other rank's hello, then sends each the payload.
fn serve(
    env: &RankEnv,
    listener: &TcpListener,
    identity: &str,
    payload: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, DistributedError> {
    let io = |what: &str, e: std::io::Error| failed(env, format!("{what}: {e}"));
    listener
        .set_nonblocking(true)
        .map_err(|e| io("listening", e))?;
    let mut joined: BTreeMap<usize, TcpStream> = BTreeMap::new();
    while joined.len() + 1 < env.world_size {
        let (mut stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..env.world_size)
                        .filter(|r| !joined.contains_key(r))
                        .map(|r| r.to_string())
                        .collect();
                    return Err(failed(
                        env,
                        format!(
                            "timed out after {} s waiting for rank(s) {} of {} (were they \
                             started, with this MASTER_ADDR and MASTER_PORT?)",
                            timeout.as_secs(),
                            missing.join(", "),
                            env.world_size
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(io("accepting a connection", e)),
        };
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(remaining(deadline))))
            .map_err(|e| io("accepting a connection", e))?;
        let hello = read_hello(&mut stream)
            .map_err(|e| failed(env, format!("a bad hello from {peer}: {e}")))?;
        let problem = if hello.world_size != env.world_size {
            Some(format!(
                "rank {} says WORLD_SIZE={}, rank 0 has {}",
                hello.rank, hello.world_size, env.world_size
            ))
        } else if hello.rank == 0 || hello.rank >= env.world_size {
            Some(format!("a second process claims RANK={}", hello.rank))
        } else if joined.contains_key(&hello.rank) {
            Some(format!("two processes claim RANK={}", hello.rank))
        } else if hello.identity != identity {
            Some(format!(
                "rank {} was started with other arguments than rank 0 (every rank needs the \
                 same flags)",
                hello.rank
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            let _ = write_reply(&mut stream, Err(&problem));
            for stream in joined.values_mut() {
                let _ = write_reply(stream, Err(&problem));
            }
            return Err(failed(env, problem));
        }
        joined.insert(hello.rank, stream);
    }
    for (rank, stream) in &mut joined {
        write_reply(stream, Ok(payload))
            .map_err(|e| io(&format!("sending the id to rank {rank}"), e))?;
    }
    Ok(payload.to_vec())
}

/// Any other rank: connects to rank 0 (retrying until it listens), says hello, waits for the
/// payload.
fn join(
    env: &RankEnv,
    identity: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, DistributedError> {
    let timed_out = |last: String| {
        failed(
            env,
            format!(
                "rank {} timed out after {} s: rank 0 did not answer ({last}); is it running, and \
                 are MASTER_ADDR and MASTER_PORT its address and a free port?",
                env.rank,
                timeout.as_secs()
            ),
        )
    };
    let mut stream = loop {
        let attempt = (env.master_addr.as_str(), env.master_port)
            .to_socket_addrs()
            .and_then(|mut addrs| {
                addrs
                    .next()
                    .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address"))
            })
            .and_then(|addr| TcpStream::connect_timeout(&addr, RETRY));
        match attempt {
            Ok(stream) => break stream,
            Err(e) if Instant::now() >= deadline => return Err(timed_out(e.to_string())),
            Err(_) => std::thread::sleep(RETRY),
        }
    };
    let io = |e: std::io::Error| {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            timed_out("no id received".into())
        } else {
            failed(
                env,
                format!("rank {}: the connection to rank 0 broke: {e}", env.rank),
            )
        }
    };
    stream
        .set_read_timeout(Some(remaining(deadline)))
        .map_err(io)?;
    write_hello(&mut stream, env, identity).map_err(io)?;
    match read_reply(&mut stream).map_err(io)? {
        Ok(payload) => Ok(payload),
        Err(problem) => Err(failed(
            env,
            format!("rank 0 refused rank {}: {problem}", env.rank),
        )),
    }
}

fn remaining(deadline: Instant) -> Duration {
    // A zero timeout means "forever" to std: keep at least a millisecond.
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

struct Hello {
    rank: usize,
    world_size: usize,
    identity: String,
}

fn write_hello(stream: &mut TcpStream, env: &RankEnv, identity: &str) -> std::io::Result<()> {
    let mut message = MAGIC.to_vec();
    message.extend_from_slice(&(env.rank as u32).to_le_bytes());
    message.extend_from_slice(&(env.world_size as u32).to_le_bytes());
    put_field(&mut message, identity.as_bytes());
    stream.write_all(&message)
}

fn read_hello(stream: &mut TcpStream) -> std::io::Result<Hello> {
    let mut magic = [0; 8];
    stream.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(invalid(
            "not a qlora rendezvous message (another program on this port?)",
        ));
    }
    let rank = read_u32(stream)? as usize;
    let world_size = read_u32(stream)? as usize;
    let identity =
        String::from_utf8(read_field(stream)?).map_err(|_| invalid("identity not UTF-8"))?;
    Ok(Hello {
        rank,
        world_size,
        identity,
    })
}

/// A reply: `MAGIC`, 0 and the payload, or 1 and why rank 0 refused.
fn write_reply(stream: &mut TcpStream, reply: Result<&[u8], &str>) -> std::io::Result<()> {
    let mut message = MAGIC.to_vec();
    match reply {
        Ok(payload) => {
            message.push(0);
            put_field(&mut message, payload);
        }
        Err(problem) => {
            message.push(1);
            put_field(&mut message, problem.as_bytes());
        }
    }
    stream.write_all(&message)?;
    stream.flush()
}

fn read_reply(stream: &mut TcpStream) -> std::io::Result<Result<Vec<u8>, String>> {
    let mut head = [0; 9];
    stream.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(invalid("not a qlora rendezvous reply"));
    }
    let field = read_field(stream)?;
    Ok(match head[8] {
        0 => Ok(field),
        _ => Err(String::from_utf8_lossy(&field).into_owned()),
    })
}

fn put_field(message: &mut Vec<u8>, bytes: &[u8]) {
    message.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    message.extend_from_slice(bytes);
}

fn read_u32(stream: &mut TcpStream) -> std::io::Result<u32> {
    let mut bytes = [0; 4];
    stream.read_exact(&mut bytes)?;
    Ok(u32::from_le_bytes(bytes))
}

fn read_field(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = read_u32(stream)?;
    if len > MAX_FIELD {
        return Err(invalid("a field longer than 1 MiB"));
    }
    let mut field = vec![0; len as usize];
    stream.read_exact(&mut field)?;
    Ok(field)
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, msg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        super::super::launcher::free_port().unwrap()
    }

    fn env(rank: usize, world_size: usize, port: u16) -> RankEnv {
        RankEnv {
            rank,
            world_size,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    #[test]
    fn every_rank_receives_rank_zeros_bytes() {
        let port = free_port();
        let id: Vec<u8> = (0..128u8).collect();
        let others: Vec<_> = (1..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    rendezvous(
                        &env(rank, 3, port),
                        "args",
                        || unreachable!("only rank 0 makes the id"),
                        Duration::from_secs(20),
                    )
                })
            })
            .collect();
        // Rank 0 comes last: the others retry until it listens.
        std::thread::sleep(Duration::from_millis(300));
        let expected = id.clone();
        let zero = rendezvous(&env(0, 3, port), "args", || Ok(id), Duration::from_secs(20));
        assert_eq!(zero.unwrap(), expected);
        for other in others {
            assert_eq!(other.join().unwrap().unwrap(), expected);
        }
    }

    #[test]
    fn a_missing_rank_times_out_naming_the_address() {
        let port = free_port();
        let started = Instant::now();
        let e = rendezvous(
            &env(0, 2, port),
            "args",
            || Ok(vec![1]),
            Duration::from_millis(500),
        )
        .unwrap_err()
        .to_string();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            e.contains(&format!("127.0.0.1:{port}")) && e.contains("rank(s) 1 of 2"),
            "{e}"
        );
        // And a rank whose rank 0 never comes.
        let e = rendezvous(
            &env(1, 2, port),
            "args",
            || unreachable!(),
            Duration::from_millis(500),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{port}")) && e.contains("timed out"),
            "{e}"
        );
    }

    #[test]
    fn ranks_with_other_arguments_are_refused() {
        let port = free_port();
        let other = std::thread::spawn(move || {
            rendezvous(
                &env(1, 2, port),
                "--batch_size 8",
                || unreachable!(),
                Duration::from_secs(20),
            )
        });
        let zero = rendezvous(
            &env(0, 2, port),
            "--batch_size 4",
            || Ok(vec![1]),
            Duration::from_secs(20),
        );
        let e = zero.unwrap_err().to_string();
        assert!(e.contains("rank 1 was started with other arguments"), "{e}");
        let e = other.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank 0 refused rank 1"), "{e}");
    }
}
