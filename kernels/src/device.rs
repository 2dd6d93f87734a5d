//! Opening a CUDA device: every way it can fail becomes a message that says what to do.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};
use qlora_core::Result;

use crate::buffer::DeviceBuffer;
use crate::error;
use crate::gemm::GemmState;
use crate::kernels::Kernels;
use crate::Precision;

/// The oldest driver API the CUDA path is built for (cudarc's `cuda-13000`).
const MIN_DRIVER_VERSION: i32 = 13000;

/// Flags that lower a training run's device memory, named in out-of-memory errors.
const MEMORY_FLAGS: &str = "a smaller --batch_size, --gradient_checkpointing, \
     shorter --max_source_length / --max_target_length";

/// An open CUDA device: its context, one stream that orders all work, cuBLASLt, and the
/// compiled kernels. Cheap to clone.
#[derive(Clone)]
pub struct Gpu {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) arch: u32,
    pub(crate) name: String,
    pub(crate) gemm: Mutex<Option<GemmState>>,
    kernels: Mutex<HashMap<Precision, Arc<Kernels>>>,
    live_bytes: AtomicUsize,
    peak_bytes: AtomicUsize,
}

/// Device memory this process allocated through [`Gpu::alloc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub live_bytes: usize,
    pub peak_bytes: usize,
    /// Used on the whole device (every process, the CUDA context included).
    pub device_used_bytes: usize,
    pub device_total_bytes: usize,
}

pub(crate) fn driver_error(what: &str, e: DriverError) -> qlora_core::Error {
    let name = e
        .error_name()
        .ok()
        .and_then(|n| n.to_str().ok())
        .unwrap_or("unknown");
    let text = e
        .error_string()
        .ok()
        .and_then(|n| n.to_str().ok())
        .unwrap_or("");
    error(format!("CUDA: {what} failed: {text} ({name})"))
}

/// Runs a cudarc call that may panic when a library or symbol is missing, as an error.
fn guarded<R>(what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(error(format!("CUDA: {what} failed: {msg}")))
        }
    }
}

impl Gpu {
    /// Opens device `ordinal`. Errors say what is missing: the driver, a recent enough driver,
    /// a device, NVRTC or cuBLASLt.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(error(
                "no CUDA driver found (libcuda.so.1): install the NVIDIA driver or use --device cpu",
            ));
        }
        guarded("opening the device", || Self::open_checked(ordinal))
    }

    fn open_checked(ordinal: usize) -> Result<Gpu> {
        result::init().map_err(|e| match e.0 {
            sys::CUresult::CUDA_ERROR_NO_DEVICE => error("no CUDA device found: use --device cpu"),
            _ => driver_error("initializing the driver (cuInit)", e),
        })?;
        let mut version = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| driver_error("reading the driver version", e))?;
        if version < MIN_DRIVER_VERSION {
            return Err(error(format!(
                "the NVIDIA driver supports CUDA {}.{}, qlora needs CUDA {}.{} (driver 580 or newer): \
                 update the driver or use --device cpu",
                version / 1000,
                version % 1000 / 10,
                MIN_DRIVER_VERSION / 1000,
                MIN_DRIVER_VERSION % 1000 / 10
            )));
        }
        let count = CudaContext::device_count().map_err(|e| driver_error("counting devices", e))?;
        if count <= 0 {
            return Err(error("no CUDA device found: use --device cpu"));
        }
        if ordinal >= count as usize {
            return Err(error(format!(
                "CUDA device {ordinal} does not exist: {count} device(s) found (0..{})",
                count - 1
            )));
        }
        for (lib, present) in [
            ("NVRTC (libnvrtc.so)", unsafe {
                cudarc::nvrtc::sys::is_culib_present()
            }),
            ("cuBLASLt (libcublasLt.so)", unsafe {
                cudarc::cublaslt::sys::is_culib_present()
            }),
        ] {
            if !present {
                return Err(error(format!(
                    "{lib} not found: install the CUDA 13 runtime libraries (or add them to \
                     LD_LIBRARY_PATH), or use --device cpu"
                )));
            }
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error("creating a context", e))?;
        // One stream orders every operation: the per-buffer event tracking cudarc does for
        // multi-stream use is not needed.
        // SAFETY: no cudarc-managed slice is shared between streams in this crate.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| driver_error("reading the compute capability", e))?;
        let name = ctx
            .name()
            .map_err(|e| driver_error("reading the device name", e))?;
        let stream = ctx.default_stream();
        keep_pool_memory(&ctx)?;
        Ok(Gpu {
            inner: Arc::new(Inner {
                ctx,
                stream,
                arch: (major * 10 + minor) as u32,
                name,
                gemm: Mutex::new(None),
                kernels: Mutex::new(HashMap::new()),
                live_bytes: AtomicUsize::new(0),
                peak_bytes: AtomicUsize::new(0),
            }),
        })
    }

    /// `NVIDIA H100 80GB HBM3 (sm_90)`.
    pub fn describe(&self) -> String {
        format!("{} (sm_{})", self.inner.name, self.inner.arch)
    }

    /// `bytes` of uninitialized device memory; `what` names it in an out-of-memory error.
    pub fn alloc(&self, bytes: usize, what: &str) -> Result<DeviceBuffer> {
        DeviceBuffer::new(self.inner.clone(), bytes, what)
    }

    /// `bytes` of zeroed device memory.
    pub fn zeros(&self, bytes: usize, what: &str) -> Result<DeviceBuffer> {
        let buf = self.alloc(bytes, what)?;
        self.memset_zero(buf.ptr(), bytes)?;
        Ok(buf)
    }

    pub fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller passes memory of at least `bytes` it owns.
        unsafe { result::memset_d8_async(ptr, 0, bytes, self.inner.stream.cu_stream()) }
            .map_err(|e| driver_error("clearing device memory", e))
    }

    /// A device copy of `data`.
    pub fn upload<T: Copy>(&self, data: &[T], what: &str) -> Result<DeviceBuffer> {
        let buf = self.alloc(std::mem::size_of_val(data), what)?;
        self.write(buf.ptr(), data)?;
        Ok(buf)
    }

    /// Copies `data` to device address `ptr` (which must hold that many bytes).
    pub fn write<T: Copy>(&self, ptr: u64, data: &[T]) -> Result<()> {
        // Synchronous: `data` may be dropped when this returns.
        // SAFETY: the caller gives a device range of at least size_of_val(data) bytes.
        unsafe {
            self.sync()?;
            result::memcpy_htod_sync(ptr, data)
        }
        .map_err(|e| driver_error("copying to the device", e))
    }

    /// Reads `len` values of `T` at device address `ptr` (waits for queued work).
    pub fn read<T: Copy + Default>(&self, ptr: u64, len: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        self.sync()?;
        // SAFETY: the caller gives a device range of at least len * size_of::<T>() bytes.
        unsafe { result::memcpy_dtoh_sync(&mut out, ptr) }
            .map_err(|e| driver_error("copying from the device", e))?;
        Ok(out)
    }

    /// Device-to-device copy of `bytes`.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller gives two ranges of at least `bytes` bytes.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.inner.stream.cu_stream()) }
            .map_err(|e| driver_error("copying on the device", e))
    }

    /// Waits for every queued operation; reports the first asynchronous failure.
    pub fn sync(&self) -> Result<()> {
        self.inner
            .stream
            .synchronize()
            .map_err(|e| driver_error("running queued GPU work", e))
    }

    pub fn memory(&self) -> Result<MemoryStats> {
        let (free, total) =
            result::mem_get_info().map_err(|e| driver_error("reading memory", e))?;
        Ok(MemoryStats {
            live_bytes: self.inner.live_bytes.load(Ordering::Relaxed),
            peak_bytes: self.inner.peak_bytes.load(Ordering::Relaxed),
            device_used_bytes: total - free,
            device_total_bytes: total,
        })
    }

    /// Forgets the peak so far (the next [`Gpu::memory`] reports the peak from now on).
    pub fn reset_peak(&self) {
        let live = self.inner.live_bytes.load(Ordering::Relaxed);
        self.inner.peak_bytes.store(live, Ordering::Relaxed);
    }

    /// The kernels compiled for activations of `precision` (compiled on first use).
    pub fn kernels(&self, precision: Precision) -> Result<Arc<Kernels>> {
        let mut cache = self
            .inner
            .kernels
            .lock()
            .map_err(|_| error("kernel cache poisoned"))?;
        if let Some(k) = cache.get(&precision) {
            return Ok(k.clone());
        }
        let k = Arc::new(Kernels::load(self, precision)?);
        cache.insert(precision, k.clone());
        Ok(k)
    }
}

/// Keeps freed memory in the device's pool instead of returning it at every synchronization, so
/// the per-step allocations of a training loop cost nothing after the first step.
fn keep_pool_memory(ctx: &CudaContext) -> Result<()> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: reads the default pool of this context's device and sets one of its attributes.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(|e| driver_error("reading the memory pool", e))?;
        let mut threshold = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut _,
        )
        .result()
        .map_err(|e| driver_error("configuring the memory pool", e))
    }
}

impl Inner {
    pub(crate) fn allocate(&self, bytes: usize, what: &str) -> Result<u64> {
        // SAFETY: a plain stream-ordered allocation on our stream.
        match unsafe { result::malloc_async(self.stream.cu_stream(), bytes) } {
            Ok(ptr) => {
                let live = self.live_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
                self.peak_bytes.fetch_max(live, Ordering::Relaxed);
                Ok(ptr)
            }
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                let (free, total) = result::mem_get_info().unwrap_or((0, 0));
                Err(error(format!(
                    "out of GPU memory: {what} needs {} but {} of {} are free ({} already held by \
                     this run); lower the need with {MEMORY_FLAGS}",
                    gib(bytes),
                    gib(free),
                    gib(total),
                    gib(self.live_bytes.load(Ordering::Relaxed))
                )))
            }
            Err(e) => Err(driver_error(
                &format!("allocating {} for {what}", gib(bytes)),
                e,
            )),
        }
    }

    /// Counts memory allocated outside [`Inner::allocate`] (the cuBLASLt workspace).
    pub(crate) fn track(&self, bytes: usize) {
        let live = self.live_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak_bytes.fetch_max(live, Ordering::Relaxed);
    }

    pub(crate) fn release(&self, bytes: usize) {
        self.live_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

fn gib(bytes: usize) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}
