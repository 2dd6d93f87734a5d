//! LoRA training on the CPU model: the loop ([`trainer`]), its optimizer, learning-rate schedule,
//! batching, JSON-lines log, checkpoints to resume from, and the trained adapters as PEFT
//! directories.

pub mod adapter;
pub mod batches;
pub mod checkpoint;
pub mod log;
pub mod optimizer;
pub mod schedule;
pub mod trainer;

pub use trainer::{train, validation_loss, Evaluation, Summary, TrainOptions};
