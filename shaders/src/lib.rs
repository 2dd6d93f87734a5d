//! qlora's inference engine on WebGPU: WGSL kernels and their wgpu host side, one async code
//! path for native (Vulkan, Metal, DX12) and the browser (wasm32, WebGPU).
//!
//! ```text
//! let engine = Engine::new(EngineOptions::default()).await?;   // the adapter's real limits
//! println!("{}", engine.report());                             // what the device granted
//! let needs = engine.plan(&config, &weights, &options)?;       // what the model needs
//! let mut model = engine.load(&config, &weights, adapter.as_ref(), &options,
//!                             &mut |p| show(p.done, p.total))?;   // native
//! let mut model = engine.load_async(&config, &weights, adapter.as_ref(), &options,
//!                             &mut |p| { show(p.done, p.total); Box::pin(paint()) }).await?;
//! let logits = model.prefill(&prompt).await?;                  // [T, vocab]
//! let logits = model.decode_step(token).await?;                // [vocab]
//! let ids = model.generate(&prompt, &GenerateOptions::greedy(32), |ids| false).await?;
//! ```
//!
//! Weights: 4-bit linear projections stay in bitsandbytes' packed layout (NF4/FP4, plain or
//! double-quantized absmax) and are dequantized inside the matrix kernels; a full-precision
//! checkpoint's projections stay full precision or are quantized on load
//! ([`LoadOptions::quantize`]); embeddings, LM heads and other full-precision matrices keep the
//! checkpoint's f32, f16 or bf16 (widened exactly in the kernels); norms and biases are f32.
//! Matrices larger than a buffer binding are split by rows. LoRA adapters run unmerged.
//!
//! Modules: [`device`] (adapter, limits, the report of what was granted), `buffers` (uploads,
//! read-back, tensors split across buffers), `kernels` (the WGSL pipelines of `wgsl/` and their
//! dispatch), `weights` (checkpoint tensors on the device), `model` (BLOOM and the LLaMA family,
//! the KV cache, the plan of a load), [`generate`] (token choice and the decoding loop).

mod buffers;
pub mod device;
pub mod generate;
mod kernels;
mod model;
mod weights;

#[cfg(test)]
mod tests;

pub use device::{request_adapter, DeviceReport, Engine, EngineOptions};
pub use generate::{GenerateOptions, Sampling};
pub use model::{Footprint, LoadOptions, LoadProgress, LoadedModel, Pause, QuantizeOnLoad};
/// The wgpu this crate is built on, for callers that bring their own adapter.
pub use wgpu;

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
