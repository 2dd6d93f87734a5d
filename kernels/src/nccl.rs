//! NCCL between the processes of a data-parallel run: the communicator of one rank on its
//! [`Gpu`], in-place sums (all-reduce) on the GPU's stream, and a watchdog that aborts the
//! communicator when a collective hangs (a peer process died) or NCCL reports an asynchronous
//! error, so that a failing rank never leaves the others waiting forever.
//!
//! libnccl is loaded at run time (cudarc's dynamic loading) by the first call here: a
//! single-GPU run never needs it.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::nccl::{result, sys};
use qlora_core::Result;

use crate::device::Gpu;
use crate::error;

/// Bytes of an `ncclUniqueId`, what rank 0 hands the other ranks to join its communicator.
pub const NCCL_ID_BYTES: usize = 128;

/// How often the watchdog looks at the communicator.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The identity of one communicator, made by rank 0 ([`NcclId::new`]) and sent to the others.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; NCCL_ID_BYTES]);

impl NcclId {
    /// A fresh id (it names rank 0's bootstrap address).
    pub fn new() -> Result<NcclId> {
        check_library()?;
        let id = result::get_uniqueid().map_err(|e| nccl_error("making a unique id", e.0))?;
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    fn raw(&self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as core::ffi::c_char),
        }
    }
}

/// Whether libnccl loads; the error says how to provide it.
pub fn check_library() -> Result<()> {
    // SAFETY: only tries to dlopen the library.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    Err(error(
        "NCCL not found (libnccl.so): data-parallel training on more than one GPU needs NCCL 2.x. \
         Put a directory holding libnccl.so on LD_LIBRARY_PATH (the pip wheel nvidia-nccl-cu12 \
         ships only libnccl.so.2: add a link named libnccl.so to it), or train on one GPU",
    ))
}

fn nccl_error(what: &str, code: sys::ncclResult_t) -> qlora_core::Error {
    // SAFETY: NCCL returns a static string for every result code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(code)) };
    error(format!(
        "NCCL: {what} failed: {} ({code:?})",
        text.to_string_lossy()
    ))
}

/// A communicator handle the watchdog thread may abort: NCCL allows `ncclCommGetAsyncError` and
/// `ncclCommAbort` from another thread than the one issuing collectives.
#[derive(Clone, Copy)]
struct CommHandle(sys::ncclComm_t);
// SAFETY: see above; the handle is used by the owner and the watchdog only.
unsafe impl Send for CommHandle {}

/// What the owner and the watchdog share.
struct Watch {
    /// When the collective now waited for started (`None`: none is in flight).
    in_flight_since: Mutex<Option<Instant>>,
    /// Why the watchdog aborted the communicator, once it has.
    aborted: Mutex<Option<String>>,
    stop: AtomicBool,
}

/// One rank's communicator among `world_size` ranks, on `gpu`.
pub struct Communicator {
    comm: CommHandle,
    gpu: Gpu,
    rank: usize,
    world_size: usize,
    watch: Arc<Watch>,
    watchdog: Option<JoinHandle<()>>,
}

impl Communicator {
    /// Joins the communicator `id` as `rank` of `world_size`. Blocks until every rank has
    /// joined, at most `timeout` (NCCL's own join cannot be cancelled, so it runs on a thread
    /// that is left behind on a timeout; the caller then exits). A collective that takes longer
    /// than `timeout` aborts the communicator.
    pub fn join(
        gpu: &Gpu,
        id: NcclId,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Communicator> {
        check_library()?;
        let (sent, received) = mpsc::channel();
        let ctx = gpu.inner.ctx.clone();
        let raw_id = id.raw();
        std::thread::spawn(move || {
            let joined = ctx
                .bind_to_thread()
                .map_err(|e| crate::device::driver_error("binding the context", e))
                .and_then(|()| {
                    let mut comm = std::ptr::null_mut();
                    // SAFETY: `comm` receives the new communicator; the id is a valid one.
                    unsafe {
                        result::comm_init_rank(&mut comm, world_size as i32, raw_id, rank as i32)
                    }
                    .map_err(|e| nccl_error("joining the communicator (ncclCommInitRank)", e.0))?;
                    Ok(CommHandle(comm))
                });
            // The receiver is gone only after a timeout, when nobody needs the result.
            let _ = sent.send(joined);
        });
        let comm = match received.recv_timeout(timeout) {
            Ok(joined) => joined?,
            Err(_) => {
                return Err(error(format!(
                    "NCCL: rank {rank} of {world_size}: the ranks did not all join the \
                     communicator within {} s (another rank failed or was not started)",
                    timeout.as_secs()
                )))
            }
        };
        let watch = Arc::new(Watch {
            in_flight_since: Mutex::new(None),
            aborted: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let watchdog = spawn_watchdog(comm, gpu, watch.clone(), timeout)?;
        Ok(Communicator {
            comm,
            gpu: gpu.clone(),
            rank,
            world_size,
            watch,
            watchdog: Some(watchdog),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Sums `len` f32 at device address `ptr` over the ranks, in place, and waits for it: the
    /// time returned is the all-reduce's alone (the work queued before it is waited for first).
    pub fn sum_f32(&self, ptr: u64, len: usize) -> Result<Duration> {
        self.sum_in_place(ptr, len, sys::ncclDataType_t::ncclFloat32)
    }

    /// Sums host values over the ranks, in place (through a small device buffer: NCCL reduces
    /// device memory only). For losses and counts: f64, so that counts stay exact.
    pub fn sum_host_f64(&self, values: &mut [f64]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let buffer = self.gpu.upload(values, "all-reduced values")?;
        self.sum_in_place(buffer.ptr(), values.len(), sys::ncclDataType_t::ncclFloat64)?;
        values.copy_from_slice(&self.gpu.read::<f64>(buffer.ptr(), values.len())?);
        Ok(())
    }

    fn sum_in_place(&self, ptr: u64, len: usize, dtype: sys::ncclDataType_t) -> Result<Duration> {
        self.gpu.sync()?;
        let started = Instant::now();
        let queued = {
            // Held while queueing: the watchdog aborts (frees) the communicator under this lock.
            let aborted = lock(&self.watch.aborted);
            self.aborted_error(&aborted)?;
            *lock(&self.watch.in_flight_since) = Some(started);
            let stream = self.gpu.inner.stream.cu_stream() as sys::cudaStream_t;
            // SAFETY: `ptr` holds `len` values of `dtype` on this communicator's device; the
            // stream is the GPU's, so the sum runs after the work that wrote them.
            unsafe {
                result::all_reduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    len,
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm.0,
                    stream,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_error("all-reduce", e.0))
        };
        // An aborted communicator ends its kernels, so this wait returns.
        let finished = queued.and_then(|()| self.gpu.sync());
        *lock(&self.watch.in_flight_since) = None;
        self.aborted_error(&lock(&self.watch.aborted))?;
        finished?;
        Ok(started.elapsed())
    }

    fn aborted_error(&self, aborted: &Option<String>) -> Result<()> {
        match aborted {
            Some(why) => Err(error(format!(
                "NCCL: rank {} of {}: {why}",
                self.rank, self.world_size
            ))),
            None => Ok(()),
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        self.watch.stop.store(true, Ordering::Relaxed);
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
        if lock(&self.watch.aborted).is_none() {
            // SAFETY: the communicator is idle (every collective was waited for) and not used
            // again; an aborted one was freed by the abort.
            let _ = unsafe { result::comm_destroy(self.comm.0) };
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking holder left plain data: still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Aborts the communicator when a collective has been in flight longer than `timeout` or NCCL
/// reports an asynchronous error (a network failure, a peer's abort); the waiting collective
/// then returns and its caller reports why.
fn spawn_watchdog(
    comm: CommHandle,
    gpu: &Gpu,
    watch: Arc<Watch>,
    timeout: Duration,
) -> Result<JoinHandle<()>> {
    let ctx = gpu.inner.ctx.clone();
    std::thread::Builder::new()
        .name("nccl-watchdog".into())
        .spawn(move || {
            // The whole handle moves here (not only its pointer field, which is not Send).
            let comm = comm;
            // NCCL's abort frees device resources: the device's context must be current.
            let _ = ctx.bind_to_thread();
            while !watch.stop.load(Ordering::Relaxed) {
                std::thread::sleep(WATCH_INTERVAL);
                let mut state = sys::ncclResult_t::ncclSuccess;
                // SAFETY: a live communicator (only this thread aborts it, after which it stops).
                unsafe { sys::ncclCommGetAsyncError(comm.0, &mut state) };
                let why = if !matches!(
                    state,
                    sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
                ) {
                    // SAFETY: as above; NCCL returns a string it owns.
                    let last = unsafe { CStr::from_ptr(sys::ncclGetLastError(comm.0)) };
                    Some(format!(
                        "NCCL reported an asynchronous error ({state:?}: {}); the communicator \
                         was aborted",
                        last.to_string_lossy()
                    ))
                } else {
                    lock(&watch.in_flight_since)
                        .filter(|since| since.elapsed() > timeout)
                        .map(|_| {
                            format!(
                                "an all-reduce did not finish within {} s (another rank failed \
                                 or stopped; see its output); the communicator was aborted",
                                timeout.as_secs()
                            )
                        })
                };
                if let Some(why) = why {
                    let mut aborted = lock(&watch.aborted);
                    *aborted = Some(why);
                    // SAFETY: under the lock the owner queues work with, which it checks first:
                    // nothing is queued on the communicator after this.
                    let _ = unsafe { result::comm_abort(comm.0) };
                    return;
                }
            }
        })
        .map_err(|e| error(format!("starting the NCCL watchdog thread: {e}")))
}
