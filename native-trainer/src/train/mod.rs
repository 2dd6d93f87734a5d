//! LoRA training: one loop ([`trainer`]) for the CPU and the CUDA model ([`Trainable`]), its
//! optimizer, learning-rate schedule, batching, JSON-lines log, checkpoints to resume from, and
//! the trained adapters as PEFT directories.

pub mod adapter;
pub mod batches;
pub mod checkpoint;
pub mod collective;
pub mod cpu_trainable;
pub mod log;
pub mod optimizer;
pub mod schedule;
pub mod trainable;
pub mod trainer;

pub use collective::{Collective, SingleProcess};
pub use cpu_trainable::CpuTrainable;
pub use trainable::Trainable;
pub use trainer::{
    train, train_data_parallel, validation_loss, Evaluation, Run, Summary, TrainOptions,
};
