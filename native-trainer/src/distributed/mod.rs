//! Data-parallel training across GPUs, as torchrun + DDP do it: one process per GPU
//! ([`env`]: which one this is), rank 0 handing NCCL's id to the others over TCP
//! ([`rendezvous`]), the LoRA gradients summed by NCCL ([`group`]), and `--nproc_per_node`
//! starting the processes of one host ([`launcher`]).

pub mod env;
pub mod group;
pub mod launcher;
pub mod rendezvous;

pub use env::RankEnv;
pub use group::NcclGroup;

/// What goes wrong in starting or joining a data-parallel run.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    #[error(
        "{name} is not set: a data-parallel process needs RANK and WORLD_SIZE, and MASTER_ADDR \
         and MASTER_PORT when WORLD_SIZE > 1 (set here: {set})"
    )]
    MissingVariable { name: &'static str, set: String },
    #[error("{name}={value}: expected {expected}")]
    BadVariable {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("rendezvous at {master} (MASTER_ADDR:MASTER_PORT): {msg}")]
    Rendezvous { master: String, msg: String },
    #[error("--nproc_per_node: {0}")]
    Launch(String),
    #[error("rank {rank} failed ({status}): {error}")]
    RankFailed {
        rank: usize,
        status: String,
        error: String,
    },
    #[error(transparent)]
    Nccl(#[from] qlora_core::Error),
}
