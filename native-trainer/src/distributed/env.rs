//! Where a process stands in a data-parallel run, from the variables torchrun sets (and
//! `qlora train --nproc_per_node` sets for its children): RANK, WORLD_SIZE, LOCAL_RANK,
//! MASTER_ADDR, MASTER_PORT.

use super::DistributedError;

/// One process of a data-parallel run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    /// 0-based rank among all processes (rank 0 writes the files).
    pub rank: usize,
    pub world_size: usize,
    /// The GPU this process trains on (its index on this host).
    pub local_rank: usize,
    /// Rank 0's host and the port of its rendezvous.
    pub master_addr: String,
    pub master_port: u16,
}

/// The variables a data-parallel process reads.
pub const VARIABLES: [&str; 5] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl RankEnv {
    /// From the process environment; `None` when none of the variables is set (a plain
    /// single-process run).
    pub fn from_env() -> Result<Option<RankEnv>, DistributedError> {
        RankEnv::from_lookup(|name| std::env::var(name).ok())
    }

    /// From `lookup` (the environment, or a table in tests). Either none of the variables is set,
    /// or RANK and WORLD_SIZE are, and with WORLD_SIZE > 1 also MASTER_ADDR and MASTER_PORT;
    /// LOCAL_RANK defaults to RANK (one host).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<RankEnv>, DistributedError> {
        let values: Vec<Option<String>> = VARIABLES.iter().map(|name| lookup(name)).collect();
        if values.iter().all(Option::is_none) {
            return Ok(None);
        }
        let [rank, world_size, local_rank, master_addr, master_port] = &values[..] else {
            unreachable!("one value per variable")
        };
        let required = |name: &'static str, value: &Option<String>| {
            value
                .clone()
                .ok_or_else(|| DistributedError::MissingVariable {
                    name,
                    set: VARIABLES
                        .iter()
                        .zip(&values)
                        .filter(|(_, v)| v.is_some())
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        };
        let number = |name: &'static str, text: String| {
            text.trim()
                .parse::<usize>()
                .map_err(|_| DistributedError::BadVariable {
                    name,
                    value: text,
                    expected: "a non-negative integer",
                })
        };
        let world_size = number("WORLD_SIZE", required("WORLD_SIZE", world_size)?)?;
        if world_size == 0 {
            return Err(DistributedError::BadVariable {
                name: "WORLD_SIZE",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        let rank = number("RANK", required("RANK", rank)?)?;
        if rank >= world_size {
            return Err(DistributedError::BadVariable {
                name: "RANK",
                value: rank.to_string(),
                expected: "below WORLD_SIZE",
            });
        }
        let local_rank = match local_rank {
            Some(text) => number("LOCAL_RANK", text.clone())?,
            None => rank,
        };
        let (master_addr, master_port) = if world_size > 1 {
            let addr = required("MASTER_ADDR", master_addr)?;
            if addr.trim().is_empty() {
                return Err(DistributedError::BadVariable {
                    name: "MASTER_ADDR",
                    value: addr,
                    expected: "a host name or address",
                });
            }
            let port_text = required("MASTER_PORT", master_port)?;
            let port = port_text
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or(DistributedError::BadVariable {
                    name: "MASTER_PORT",
                    value: port_text,
                    expected: "a port number from 1 to 65535",
                })?;
            (addr.trim().to_string(), port)
        } else {
            // One process: nobody to meet.
            (master_addr.clone().unwrap_or_default(), 0)
        };
        Ok(Some(RankEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        }))
    }

    /// `MASTER_ADDR:MASTER_PORT`, for messages.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Option<RankEnv>, DistributedError> {
        RankEnv::from_lookup(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn torchrun_variables_give_the_rank() {
        assert_eq!(parse(&[]).unwrap(), None);
        let env = parse(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            env,
            RankEnv {
                rank: 3,
                world_size: 4,
                local_rank: 1,
                master_addr: "node0".into(),
                master_port: 29500
            }
        );
        assert_eq!(env.master(), "node0:29500");
        // One process needs no rendezvous; LOCAL_RANK defaults to RANK.
        let single = parse(&[("RANK", "0"), ("WORLD_SIZE", "1")])
            .unwrap()
            .unwrap();
        assert_eq!((single.world_size, single.local_rank), (1, 0));
    }

    #[test]
    fn bad_or_missing_variables_are_named() {
        let message = |vars: &[(&str, &str)]| parse(vars).unwrap_err().to_string();
        let base = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let without = |name: &str| -> Vec<(&str, &str)> {
            base.iter().copied().filter(|(n, _)| *n != name).collect()
        };
        let with = |name: &'static str, value: &'static str| -> Vec<(&str, &str)> {
            base.iter()
                .map(|&(n, v)| if n == name { (n, value) } else { (n, v) })
                .collect()
        };
        let e = message(&without("WORLD_SIZE"));
        assert!(
            e.contains("WORLD_SIZE is not set") && e.contains("RANK"),
            "{e}"
        );
        let e = message(&without("MASTER_PORT"));
        assert!(e.contains("MASTER_PORT is not set"), "{e}");
        let e = message(&with("RANK", "2"));
        assert!(
            e.contains("RANK=2") && e.contains("below WORLD_SIZE"),
            "{e}"
        );
        let e = message(&with("RANK", "one"));
        assert!(e.contains("RANK=one"), "{e}");
        let e = message(&with("WORLD_SIZE", "0"));
        assert!(e.contains("WORLD_SIZE=0"), "{e}");
        let e = message(&with("MASTER_PORT", "70000"));
        assert!(
            e.contains("MASTER_PORT=70000") && e.contains("65535"),
            "{e}"
        );
        let e = message(&with("MASTER_ADDR", " "));
        assert!(e.contains("MASTER_ADDR"), "{e}");
    }
}
