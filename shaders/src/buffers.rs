//! Device buffers: uploads, scratch space, read-back (the one await of the engine), and
//! matrices split by rows across buffers that each fit the device's binding limit.

use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use qlora_core::{DType, Error, Result};
use wgpu::util::DeviceExt;

use crate::device::Engine;

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Checks that a buffer of `bytes` for `what` fits the device, with a message that says what
/// was needed and what the device grants.
pub(crate) fn check_fits(engine: &Engine, what: &str, bytes: u64) -> Result<()> {
    let limit = engine.binding_size();
    if bytes > limit {
        return Err(Error::Invalid(format!(
            "{what} needs a buffer of {bytes} bytes; the device binds at most {limit} bytes \
             ({})",
            engine.report()
        )));
    }
    Ok(())
}

/// Every storage buffer is a whole number of 16-byte loads: the matvec kernels read weights
/// and inputs as `vec4` (`wgsl/matvec.wgsl`), and a binding's last partial `vec4` would be out
/// of bounds.
pub(crate) const ALIGN: usize = 16;

/// `bytes` rounded up to whole [`ALIGN`]ed loads (at least one).
pub(crate) fn padded(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN).max(1) * ALIGN
}

/// A storage buffer holding `data`, zero-padded ([`padded`]).
pub(crate) fn upload(engine: &Engine, label: &str, data: &[u8]) -> Result<wgpu::Buffer> {
    let padded = padded(data.len());
    check_fits(engine, label, padded as u64)?;
    let mut contents = data.to_vec();
    contents.resize(padded, 0);
    Ok(engine
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: &contents,
            usage: STORAGE,
        }))
}

pub(crate) fn upload_f32(engine: &Engine, label: &str, values: &[f32]) -> Result<wgpu::Buffer> {
    upload(engine, label, bytemuck::cast_slice(values))
}

/// A zeroed storage buffer of `words` 4-byte elements ([`padded`]).
pub(crate) fn scratch(engine: &Engine, label: &str, words: usize) -> Result<wgpu::Buffer> {
    let bytes = padded(words * 4) as u64;
    check_fits(engine, label, bytes)?;
    Ok(engine.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes,
        usage: STORAGE,
        mapped_at_creation: false,
    }))
}

/// A uniform buffer holding `params`, padded to 16 bytes.
pub(crate) fn uniform(engine: &Engine, params: &[u8]) -> wgpu::Buffer {
    let mut contents = params.to_vec();
    contents.resize(contents.len().div_ceil(16) * 16, 0);
    engine
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: &contents,
            usage: wgpu::BufferUsages::UNIFORM,
        })
}

/// Submits `encoder` after copying `bytes` from the start of `source`, and returns them once
/// the GPU is done; `Err` when the device rejected this work or reported an error since the
/// last read.
pub(crate) async fn submit_and_read(
    engine: &Engine,
    encoder: wgpu::CommandEncoder,
    source: &wgpu::Buffer,
    bytes: u64,
) -> Result<Vec<u8>> {
    submit_with_read(engine, encoder, source, bytes)
        .read(engine)
        .await
}

/// Submits `encoder` after copying `bytes` from the start of `source` to a buffer of its own;
/// [`PendingRead::read`] returns them once the GPU is done with this submission (later ones may
/// still run: that is how generation records a step while the previous one computes).
pub(crate) fn submit_with_read(
    engine: &Engine,
    mut encoder: wgpu::CommandEncoder,
    source: &wgpu::Buffer,
    bytes: u64,
) -> PendingRead {
    let staging = engine.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("read-back"),
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    encoder.copy_buffer_to_buffer(source, 0, &staging, 0, bytes);
    // An invalid command (a rejected pipeline or binding) invalidates the whole submission,
    // whose outputs then read back as zeros: the scope turns that into an error.
    let scope = engine
        .device
        .push_error_scope(wgpu::ErrorFilter::Validation);
    let submission = engine.queue.submit([encoder.finish()]);
    let submit_error = Box::pin(scope.pop());
    let slot: Arc<Mutex<MapSlot>> = Arc::default();
    let callback_slot = Arc::clone(&slot);
    staging.map_async(wgpu::MapMode::Read, .., move |result| {
        let mut slot = callback_slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.0 = Some(result);
        if let Some(waker) = slot.1.take() {
            waker.wake();
        }
    });
    PendingRead {
        staging,
        submission,
        submit_error,
        slot,
    }
}

/// The outcome of a read-back's mapping, and the task waiting on it.
type MapSlot = (
    Option<std::result::Result<(), wgpu::BufferAsyncError>>,
    Option<Waker>,
);

/// A submission whose read-back has not been awaited (see [`submit_with_read`]).
pub(crate) struct PendingRead {
    staging: wgpu::Buffer,
    /// What a native read waits for (in the browser the event loop maps the buffer).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    submission: wgpu::SubmissionIndex,
    submit_error: std::pin::Pin<Box<dyn std::future::Future<Output = Option<wgpu::Error>>>>,
    slot: Arc<Mutex<MapSlot>>,
}

impl PendingRead {
    /// The bytes once this submission is done; `Err` when the device rejected it or reported
    /// an error since the last read.
    pub(crate) async fn read(self, engine: &Engine) -> Result<Vec<u8>> {
        // Natively the callback runs inside a poll; in the browser the event loop runs it.
        #[cfg(not(target_arch = "wasm32"))]
        {
            let this_one = wgpu::PollType::Wait {
                submission_index: Some(self.submission.clone()),
                timeout: None,
            };
            if engine.device.poll(this_one).is_err() {
                // A rejected submission has no index to wait on: wait for all the work (the
                // error scope below says why it was rejected).
                engine
                    .device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .map_err(|e| Error::Invalid(format!("WebGPU device poll failed: {e}")))?;
            }
        }
        let slot = &self.slot;
        std::future::poll_fn(|cx| {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            match slot.0.take() {
                Some(result) => Poll::Ready(result),
                None => {
                    slot.1 = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
        .map_err(|e| Error::Invalid(format!("reading a WebGPU buffer back failed: {e}")))?;
        if let Some(error) = self.submit_error.await {
            return Err(Error::Invalid(format!("WebGPU rejected the work: {error}")));
        }
        engine.errors.check()?;
        let data = self
            .staging
            .get_mapped_range(..)
            .map_err(|e| Error::Invalid(format!("reading a WebGPU buffer back failed: {e}")))?
            .to_vec();
        self.staging.unmap();
        Ok(data)
    }
}

/// How a full-precision matrix is stored on the device: half-precision checkpoints keep their
/// dtype (half the memory; weights_dense.wgsl widens them exactly), anything else is f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dense {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

impl Dense {
    /// The value of weights_dense.wgsl's `DTYPE`.
    pub(crate) fn shader_code(self) -> u32 {
        self as u32
    }

    pub(crate) fn size(self) -> usize {
        match self {
            Dense::F32 => 4,
            Dense::F16 | Dense::Bf16 => 2,
        }
    }

    /// The storage of a checkpoint tensor of `dtype`.
    pub(crate) fn of(dtype: DType) -> Dense {
        match dtype {
            DType::F16 => Dense::F16,
            DType::BF16 => Dense::Bf16,
            _ => Dense::F32,
        }
    }
}

/// A row-major full-precision matrix as little-endian elements of `dtype`.
pub(crate) struct Matrix {
    pub dtype: Dense,
    pub data: Vec<u8>,
}

impl Matrix {
    /// An f32 matrix rounded to bf16 (nearest even).
    pub(crate) fn to_bf16(&self) -> Matrix {
        let values: &[f32] = bytemuck::cast_slice(&self.data);
        let data = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        Matrix {
            dtype: Dense::Bf16,
            data,
        }
    }
}

/// A row-major matrix `[rows, cols]` in as few buffers as the binding limit allows, each
/// holding whole rows.
#[derive(Clone)]
pub(crate) struct RowSplit {
    pub cols: usize,
    pub dtype: Dense,
    pub parts: Vec<RowPart>,
}

/// Buffers are handles: a clone shares the device memory.
#[derive(Clone)]
pub(crate) struct RowPart {
    pub first_row: usize,
    pub rows: usize,
    pub buffer: wgpu::Buffer,
}

/// Rows of `cols` elements of `element_size` bytes per buffer, or an error when one row is
/// too large to bind.
pub(crate) fn rows_per_buffer(
    engine: &Engine,
    name: &str,
    cols: usize,
    element_size: usize,
) -> Result<usize> {
    let row_bytes = (cols * element_size) as u64;
    check_fits(engine, &format!("one row of {name}"), row_bytes)?;
    Ok((engine.binding_size() / row_bytes.max(1)) as usize)
}

impl RowSplit {
    pub(crate) fn upload(
        engine: &Engine,
        name: &str,
        matrix: &Matrix,
        cols: usize,
    ) -> Result<RowSplit> {
        let size = matrix.dtype.size();
        let per_part = rows_per_buffer(engine, name, cols, size)?;
        let rows = matrix.data.len() / (cols * size).max(1);
        let parts = (0..rows)
            .step_by(per_part.max(1))
            .map(|first_row| {
                let n = per_part.min(rows - first_row);
                let bytes = &matrix.data[first_row * cols * size..(first_row + n) * cols * size];
                Ok(RowPart {
                    first_row,
                    rows: n,
                    buffer: upload(engine, name, bytes)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RowSplit {
            cols,
            dtype: matrix.dtype,
            parts,
        })
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.buffer.size()).sum()
    }
}
