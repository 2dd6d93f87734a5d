//! qlora's inference engine on WebGPU: WGSL kernels and their wgpu host side, one async code
//! path for native (Vulkan, Metal, DX12) and the browser (wasm32, WebGPU).
//!
//! ```text
//! let engine = Engine::new(EngineOptions::default()).await?;       // the adapter's real limits
//! let mut model = engine.load(&config, &weights, adapter.as_ref(), &LoadOptions::default(),
//!                             &mut |p| show(p))?;                  // 4-bit weights stay 4-bit
//! let logits = model.prefill(&prompt).await?;                      // [T, vocab]
//! let ids = model.generate(&prompt, &GenerateOptions::greedy(32), |ids| false).await?;
//! ```
//!
//! Modules: [`device`] (adapter, limits, the report of what was granted), `buffers` (uploads,
//! read-back, tensors split across buffers), `kernels` (the WGSL pipelines and their dispatch),
//! `weights` (checkpoint tensors on the device), `model` (BLOOM and the LLaMA family, the KV
//! cache), [`generate`] (token choice and the decoding loop).

mod buffers;
pub mod device;
pub mod generate;
mod kernels;
mod model;
mod weights;

#[cfg(test)]
mod tests;

pub use device::{DeviceReport, Engine, EngineOptions};
pub use generate::{GenerateOptions, Sampling};
pub use model::{Footprint, LoadOptions, LoadProgress, LoadedModel, QuantizeOnLoad};

/// Runs a future to completion on this thread (native only: wgpu's futures resolve once the
/// device is polled, which the engine does before it awaits them; the browser has its own
/// executor).
#[cfg(not(target_arch = "wasm32"))]
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = future.as_mut().poll(&mut context) {
            return v;
        }
        std::thread::yield_now();
    }
}
