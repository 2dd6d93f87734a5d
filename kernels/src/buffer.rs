//! Device memory: stream-ordered allocations from the device's memory pool, freed on drop.

use std::sync::Arc;

use cudarc::driver::{result, sys};
use qlora_core::Result;

use crate::device::Inner;

/// A block of device memory of `bytes` bytes (256-byte aligned), untyped: kernels and GEMMs get
/// its address. Freed (stream-ordered) when dropped.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    inner: Arc<Inner>,
}

impl DeviceBuffer {
    pub(crate) fn new(inner: Arc<Inner>, bytes: usize, what: &str) -> Result<DeviceBuffer> {
        let ptr = inner.allocate(bytes.max(1), what)?;
        Ok(DeviceBuffer { ptr, bytes, inner })
    }

    /// The device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The address `offset` bytes in; panics past the end (a caller's bug, not input).
    pub fn at(&self, offset: usize) -> u64 {
        assert!(
            offset <= self.bytes,
            "offset {offset} past a buffer of {} bytes",
            self.bytes
        );
        self.ptr + offset as u64
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: the pointer came from this stream's pool and is freed once; work queued on the
        // stream that still uses it runs before the free (stream order).
        let freed = unsafe { result::free_async(self.ptr, self.inner.stream.cu_stream()) };
        if freed.is_ok() {
            self.inner.release(self.bytes.max(1));
        }
    }
}
