//! Reading and writing checkpoints: safetensors (single and sharded), PyTorch `.bin` pickles
//! (single and sharded), tensor by tensor, never the whole model in memory at once.

use crate::{DType, Result};

pub mod bnb4bit;
mod bytes;
mod files;
mod names;
#[cfg(not(target_arch = "wasm32"))]
mod open;
mod pickle;
pub mod safetensors;
pub mod safetensors_writer;
pub mod sharded;
#[cfg(not(target_arch = "wasm32"))]
pub mod spill;
pub mod torch;
mod zip_index;

pub use files::{open_in_memory, CHECKPOINT_FILES};
pub use names::StoredNames;
#[cfg(not(target_arch = "wasm32"))]
pub use open::{open_checkpoint, open_file};
pub use safetensors::SafetensorsFile;
pub use safetensors_writer::SafetensorsWriter;
pub use sharded::ShardedCheckpoint;
pub use torch::{TorchFile, TorchTensorInfo};

/// Name, element type and shape of one tensor of a checkpoint, known without reading its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One tensor's data, contiguous (row-major) little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// The values as f32 (f32/f16/bf16/f64 only); `None` for integer tensors.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        crate::dtype::to_f32(self.dtype, &self.data)
    }
}

/// Any checkpoint, as `open_checkpoint` returns it.
pub type BoxedSource = Box<dyn TensorSource + Send + Sync>;

/// A checkpoint that yields its tensors one at a time.
pub trait TensorSource {
    /// Every tensor, sorted by name.
    fn tensor_infos(&self) -> Vec<TensorInfo>;
    /// Reads one tensor. The error names the file and the tensor.
    fn read(&self, name: &str) -> Result<RawTensor>;
    /// The file that holds `name` (for messages).
    fn file_of(&self, name: &str) -> Option<String>;
    /// The bitsandbytes 4-bit form of weight `name`, for engines that keep the base packed (the
    /// CUDA path); `None` when this source does not hold `name` as 4-bit.
    fn quantized(&self, _name: &str) -> Option<Result<crate::quant::Quantized4>> {
        None
    }
}

impl<T: TensorSource + ?Sized> TensorSource for Box<T> {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        (**self).tensor_infos()
    }
    fn read(&self, name: &str) -> Result<RawTensor> {
        (**self).read(name)
    }
    fn file_of(&self, name: &str) -> Option<String> {
        (**self).file_of(name)
    }
    fn quantized(&self, name: &str) -> Option<Result<crate::quant::Quantized4>> {
        (**self).quantized(name)
    }
}
