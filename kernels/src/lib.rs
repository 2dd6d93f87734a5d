//! CUDA kernels of qlora and their host side: a [`Gpu`] context that opens a device with clear
//! errors, device buffers with peak-memory accounting, CUDA C sources compiled at run time by
//! NVRTC (cached per device, in memory and on disk), cuBLASLt GEMMs, and one host wrapper per
//! kernel ([`Kernels`]), and NCCL's all-reduce between the GPUs of a data-parallel run
//! ([`Communicator`]).
//!
//! Everything is loaded at run time (cudarc's dynamic loading): this crate builds, and code that
//! uses it runs its CPU paths, on machines without CUDA; [`Gpu::open`] then says what is missing.
//!
//! Activations come in one of two [`Precision`]s: `F32` (a check mode, tight against the CPU
//! reference) or `Bf16` (training). Every kernel source is compiled once per precision.

mod buffer;
mod compile;
mod device;
mod gemm;
mod graph;
mod kernels;
mod nccl;

pub use buffer::DeviceBuffer;
pub use device::{Gpu, MemoryStats};
pub use gemm::Gemm;
pub use graph::Recorded;
pub use kernels::{
    AdamWCoefficients, CachedAttention, DeviceAbsmax, DeviceQuantized, GemvKernel, Kernels,
    LoraTerm, SoftmaxArgs,
};
pub use nccl::{check_library as check_nccl, Communicator, NcclId, NCCL_ID_BYTES};

/// The element type of activations and of the frozen weights they multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    pub fn size(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }

    fn c_type(self) -> &'static str {
        match self {
            Precision::F32 => "float",
            Precision::Bf16 => "__nv_bfloat16",
        }
    }
}

/// A library error with a message (every CUDA failure is turned into one of these).
pub(crate) fn error(msg: impl Into<String>) -> qlora_core::Error {
    qlora_core::Error::Invalid(msg.into())
}
