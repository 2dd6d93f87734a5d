//! Generation: the decoding loop over a KV cache ([`generate_batch`]) for any [`Generator`]
//! (the CPU model; the CUDA engine in [`crate::cuda`]), token choice ([`sampling`]), text-level
//! stops and streaming ([`text`]), the full-forward greedy reference the other compute paths are
//! checked against ([`greedy_reference`]), loading a base model with an adapter for generation
//! ([`model`]) and the ADGEN evaluation ([`evaluate`]).

mod decode;
mod eval;
pub mod model;
mod reference;
pub mod sampling;
/// Generation as text lives in core (the browser chat shares it).
pub use qlora_core::response as text;

pub use decode::{generate, generate_batch, GenerateOptions, Generator, Session};
pub use eval::{evaluate, EvalOptions, Evaluation, Example, Prediction};
pub use reference::greedy_reference;
pub use sampling::{Sampler, SamplingParams};
