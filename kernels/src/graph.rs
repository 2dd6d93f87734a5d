//! Recorded GPU work (CUDA graphs): a decoding step is some 500 small launches whose host cost
//! (a few microseconds each) exceeds their run time; recorded once, the step is replayed with one
//! call and the GPU runs the launches back to back.

use cudarc::driver::{sys, CudaGraph};
use qlora_core::Result;

use crate::device::{driver_error, Gpu};

/// Work recorded by [`Gpu::record`], replayed by [`Recorded::launch`]. Its kernels read the
/// device memory they were recorded with: what changes between replays (a step's token ids, the
/// number of cached tokens) must be written there, not passed as launch arguments.
pub struct Recorded {
    graph: CudaGraph,
}

impl Gpu {
    /// Records the work `record` queues on this device's stream instead of running it. Device
    /// memory `record` allocates and frees becomes part of the recording (the same addresses at
    /// every replay); it must not synchronize, copy from or to the host, or free memory allocated
    /// before it.
    pub fn record(&self, record: impl FnOnce() -> Result<()>) -> Result<Recorded> {
        let stream = &self.inner.stream;
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| driver_error("starting to record GPU work", e))?;
        let recorded = record();
        // The capture ends whatever happened, so the stream runs work again.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        match graph.map_err(|e| driver_error("recording GPU work", e))? {
            Some(graph) => Ok(Recorded { graph }),
            None => Err(crate::error("recording GPU work gave an empty graph")),
        }
    }
}

impl Recorded {
    /// Queues the recorded work on the stream it was recorded from.
    pub fn launch(&self) -> Result<()> {
        self.graph
            .launch()
            .map_err(|e| driver_error("replaying recorded GPU work", e))
    }
}
