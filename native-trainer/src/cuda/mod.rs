//! The CUDA path: BLOOM and LLaMA-family forward and backward passes written out by hand
//! (llm.c style) on the kernels of `qlora-kernels`, with the frozen base kept 4-bit on the GPU
//! and dequantized just in time per projection, LoRA matrices in fp32 master copies, an LM head
//! fused with the cross-entropy in token chunks, AdamW on the GPU, and optional per-layer
//! recomputation; and generation ([`generate`]) over a KV cache with a fused 4-bit GEMV.
//!
//! The CPU path ([`crate::cpu`]) is the reference: the same checkpoint, LoRA initialization
//! and batch give the same loss and LoRA gradients (to f32 rounding in the `F32` precision).

mod attention;
mod batch;
pub mod bench;
mod blocks;
pub mod decode_bench;
pub mod generate;
mod head;
mod linear;
mod lora;
pub mod model;
mod trainable;
mod weights;

pub use batch::GpuBatch;
pub use generate::GpuKvCache;
pub use lora::LoraGradients;
pub use model::{CudaModel, CudaOptions};
pub use qlora_kernels::{Gpu, Precision};
