//! qlora-trainer as a library: the compute paths the `qlora` binary drives.
//!
//! - [`cpu`]: the CPU reference implementation of the models, LoRA and the causal-LM loss
//!   (candle-core), which the GPU paths are checked against.
//! - [`distributed`]: data-parallel training over several GPUs (NCCL), and its launcher.
//! - [`generate`]: decoding with a KV cache, sampling, streaming and the ADGEN evaluation.

pub mod cpu;
pub mod cuda;
pub mod distributed;
pub mod generate;
pub mod load;
pub mod merge;
pub mod progress;
pub mod train;
