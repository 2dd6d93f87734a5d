//! A model on the device, batch 1: the weights, the KV cache, and the forward pass that feeds
//! new tokens (a prompt in chunks, then one token per step) through the cache.
//!
//! Per step: the embedding rows are copied (the embedding may be split across buffers, and the
//! host knows the ids), each layer runs ([`bloom`], [`llama`]), then the final norm and the LM
//! head for the positions whose logits are wanted.

mod bloom;
mod llama;
mod plan;

use qlora_core::arch::{ArchDescription, LmHead, ModelConfig};
use qlora_core::checkpoint::TensorSource;
use qlora_core::peft::LoraAdapter;
use qlora_core::quant::QuantType;
use qlora_core::{Error, Result};

use crate::buffers::{scratch, submit_and_read, upload_f32, Dense, RowSplit};
use crate::device::Engine;
use crate::kernels::{BindingCache, LinearParams, Recorder, StepBuffer, WeightBinding};
use crate::weights::{Checkpoint, Linear, Norm};

/// Quantize a full-precision checkpoint's linear weights on load, as `qlora quantize` would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeOnLoad {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub double_quant: bool,
}

impl QuantizeOnLoad {
    /// QLoRA's choice: NF4, blocks of 64, double quantization.
    pub const QLORA: QuantizeOnLoad = QuantizeOnLoad {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: true,
    };
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// `None`: full-precision linear weights stay f32 (a 4-bit checkpoint stays 4-bit either way).
    pub quantize: Option<QuantizeOnLoad>,
    /// Tokens the KV cache holds.
    pub max_seq_len: usize,
    /// Tokens fed per forward pass (a longer prompt goes in several).
    pub chunk: usize,
    /// Store an f32 LM head as bf16 (rounded to nearest even; the embedding too where the head
    /// is tied to it), as the CUDA path keeps it: half the bytes a decoding step reads (the
    /// head is most of them for large vocabularies), and logits within bf16's precision of the
    /// f32 ones (products still accumulate in f32). Off by default: the logits then equal the
    /// CPU path's to f32 rounding.
    pub bf16_lm_head: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quantize: None,
            max_seq_len: 2048,
            chunk: 32,
            bf16_lm_head: false,
        }
    }
}

/// What a load awaits after each tensor ([`Engine::load_async`]): a page's chance to paint its
/// progress bar, which a load that never yields would hold back to the end.
pub type Pause = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// Where a load is, after each tensor (for a progress bar).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadProgress<'a> {
    pub tensor: &'a str,
    pub done: usize,
    pub total: usize,
    /// Bytes on the device so far.
    pub bytes: u64,
}

/// What a loaded model occupies on the device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Footprint {
    pub weight_bytes: u64,
    pub cache_bytes: u64,
    pub activation_bytes: u64,
    /// Tensors split across buffers, with their number of parts.
    pub split_tensors: Vec<(String, usize)>,
}

/// Sizes of one model, as the kernels use them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub hidden: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_seq: usize,
    pub chunk: usize,
}

/// The buffers every architecture's layers share, sized for `chunk` tokens.
pub(crate) struct Shared {
    /// `[chunk, H]`: the residual stream.
    pub hidden: wgpu::Buffer,
    /// `[chunk, H]`
    pub normed: wgpu::Buffer,
    /// `[chunk, heads * head_dim]`
    pub context: wgpu::Buffer,
    /// `[chunk, heads, max_seq]`
    pub scores: wgpu::Buffer,
    /// `[chunk, max LoRA rank]`
    pub lora: wgpu::Buffer,
    /// Whether the adapter's LoRA terms are added ([`LoadedModel::set_adapter_enabled`]).
    pub lora_enabled: bool,
}

impl Shared {
    /// The LoRA scratch for the linear projections, `None` while the adapter is switched off
    /// (the projections then skip their LoRA terms: the base model's output).
    pub fn lora_scratch(&self) -> Option<&wgpu::Buffer> {
        self.lora_enabled.then_some(&self.lora)
    }
}

/// One step's view of the shared state, handed to each layer.
pub(crate) struct Step<'a> {
    pub dims: Dims,
    pub shared: &'a Shared,
    /// New tokens (the tokens already cached are in the step buffer).
    pub t: usize,
    pub step_buffer: &'a StepBuffer,
}

enum Layers {
    Bloom(bloom::Bloom),
    Llama(llama::Llama),
}

/// A model on the device with its KV cache. Batch 1.
pub struct LoadedModel {
    engine: Engine,
    dims: Dims,
    layers: Layers,
    embedding: RowSplit,
    final_norm: Norm,
    lm_head: Linear,
    shared: Shared,
    /// Each layer's key and value cache, `[max_seq, kv_heads, head_dim]`.
    cache: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    /// `[H]`: the last position's normed hidden state, for last-token logits.
    last_row: wgpu::Buffer,
    /// `[chunk, V]`
    logits: wgpu::Buffer,
    /// `[max_seq]` u32: the distinct ids the repetition penalty applies to.
    context_ids: wgpu::Buffer,
    /// `[1]` u32: the chosen token.
    token: wgpu::Buffer,
    /// The tokens already cached and the new ids, written before each forward pass.
    step_buffer: StepBuffer,
    /// The bind groups of the forward passes, built once.
    bindings: BindingCache,
    past: usize,
    footprint: Footprint,
}

/// The tokens of a forward pass: ids from the host, or the one token the previous pass chose,
/// which it left on the device (see [`LoadedModel::record_forward_chosen`]).
#[derive(Clone, Copy)]
pub(crate) enum Input<'a> {
    Host(&'a [u32]),
    Chosen,
}

/// Which logits a forward pass produces.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outputs {
    AllPositions,
    LastPosition,
}

impl Engine {
    /// Loads the model of `config` from `weights` (full precision or HF 4-bit, with or without
    /// the base-model prefix) with the PEFT `adapter` applied unmerged. `progress` sees each
    /// tensor as it arrives on the device. Fails before reading any tensor when a buffer of the
    /// model cannot fit the device ([`Engine::plan`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load(
        &self,
        config: &ModelConfig,
        weights: &dyn TensorSource,
        adapter: Option<&LoraAdapter>,
        options: &LoadOptions,
        progress: &mut dyn FnMut(&LoadProgress<'_>),
    ) -> Result<LoadedModel> {
        let mut unpaced = |p: &LoadProgress<'_>| -> Pause {
            progress(p);
            Box::pin(std::future::ready(()))
        };
        crate::block_on(self.load_async(config, weights, adapter, options, &mut unpaced))
    }

    /// [`Engine::load`] that awaits the [`Pause`] `progress` returns after each tensor (in a
    /// browser: a timer, so that the page shows the progress while the model loads).
    pub async fn load_async(
        &self,
        config: &ModelConfig,
        weights: &dyn TensorSource,
        adapter: Option<&LoraAdapter>,
        options: &LoadOptions,
        progress: &mut dyn FnMut(&LoadProgress<'_>) -> Pause,
    ) -> Result<LoadedModel> {
        if options.chunk == 0 || options.max_seq_len == 0 {
            return Err(Error::Invalid(
                "chunk and max_seq_len must be at least 1".into(),
            ));
        }
        self.plan(config, weights, options)?;
        let description = config.describe();
        if let Some(adapter) = adapter {
            check_adapter_modules(adapter, &description)?;
        }
        let checkpoint = Checkpoint::new(weights, &description);
        let mut loader = Loader {
            engine: self,
            checkpoint: &checkpoint,
            adapter,
            quantize: options.quantize,
            progress,
            done: 0,
            total: description.tensors().len(),
            footprint: Footprint::default(),
        };
        let embedding_spec = description.token_embedding().clone();
        let tied = lm_head_of(&description) == &LmHead::TiedToEmbedding;
        let embedding = loader
            .rows(
                &embedding_spec.name,
                embedding_spec.vocab_size,
                embedding_spec.hidden_size,
                options.bf16_lm_head && tied,
            )
            .await?;
        let (layers, final_norm, lm_head_spec, dims) = match &description {
            ArchDescription::Bloom(d) => {
                let c = &d.config;
                let dims = Dims {
                    hidden: c.hidden_size,
                    vocab: c.vocab_size,
                    heads: c.n_head,
                    kv_heads: c.n_head,
                    head_dim: c.head_dim(),
                    max_seq: options.max_seq_len,
                    chunk: options.chunk,
                };
                let bloom = bloom::Bloom::load(&mut loader, d, dims).await?;
                (
                    Layers::Bloom(bloom),
                    loader.norm(&d.ln_f).await?,
                    &d.lm_head,
                    dims,
                )
            }
            ArchDescription::Llama(d) => {
                let c = &d.config;
                let dims = Dims {
                    hidden: c.hidden_size,
                    vocab: c.vocab_size,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    max_seq: options.max_seq_len,
                    chunk: options.chunk,
                };
                let llama = llama::Llama::load(&mut loader, d, dims).await?;
                (
                    Layers::Llama(llama),
                    loader.norm(&d.norm).await?,
                    &d.lm_head,
                    dims,
                )
            }
        };
        let lm_head = match lm_head_spec {
            LmHead::TiedToEmbedding => Linear::from_rows(embedding.clone(), dims.vocab),
            LmHead::Separate(spec) => Linear::from_rows(
                loader
                    .rows(
                        &spec.name,
                        spec.vocab_size,
                        spec.hidden_size,
                        options.bf16_lm_head,
                    )
                    .await?,
                dims.vocab,
            ),
        };
        let mut footprint = loader.footprint;
        let max_rank = adapter
            .map(|a| a.modules.values().map(|p| p.r).max().unwrap_or(1))
            .unwrap_or(1);
        let c = dims.chunk;
        let shared = Shared {
            hidden: scratch(self, "hidden", c * dims.hidden)?,
            normed: scratch(self, "normed", c * dims.hidden)?,
            context: scratch(self, "attention context", c * dims.heads * dims.head_dim)?,
            scores: scratch(self, "attention scores", c * dims.heads * dims.max_seq)?,
            lora: scratch(self, "LoRA", c * max_rank)?,
            lora_enabled: true,
        };
        let cache_words = dims.max_seq * dims.kv_heads * dims.head_dim;
        let cache = (0..config.num_layers())
            .map(|i| {
                Ok((
                    scratch(self, &format!("layer {i} key cache"), cache_words)?,
                    scratch(self, &format!("layer {i} value cache"), cache_words)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let logits = scratch(self, "logits", c * dims.vocab)?;
        let last_row = scratch(self, "last hidden row", dims.hidden)?;
        let context_ids = scratch(self, "context ids", dims.max_seq)?;
        let token = scratch(self, "token", 1)?;
        let step_buffer = StepBuffer::new(self, c)?;
        footprint.cache_bytes = cache.iter().map(|(k, v)| k.size() + v.size()).sum();
        footprint.activation_bytes = [
            &shared.hidden,
            &shared.normed,
            &shared.context,
            &shared.scores,
            &shared.lora,
            &logits,
            &last_row,
            &context_ids,
            &token,
            &step_buffer.buffer,
        ]
        .iter()
        .map(|b| b.size())
        .sum::<u64>()
            + match &layers {
                Layers::Bloom(m) => m.scratch_bytes(),
                Layers::Llama(m) => m.scratch_bytes(),
            };
        Ok(LoadedModel {
            engine: self.clone(),
            dims,
            layers,
            embedding,
            final_norm,
            lm_head,
            shared,
            cache,
            last_row,
            logits,
            context_ids,
            token,
            step_buffer,
            bindings: BindingCache::default(),
            past: 0,
            footprint,
        })
    }
}

/// Where the model's logits come from.
pub(crate) fn lm_head_of(description: &ArchDescription) -> &LmHead {
    match description {
        ArchDescription::Bloom(d) => &d.lm_head,
        ArchDescription::Llama(d) => &d.lm_head,
    }
}

/// Every module of the adapter must be a linear projection of the model: an adapter for
/// another model must not load silently without its effect.
fn check_adapter_modules(adapter: &LoraAdapter, description: &ArchDescription) -> Result<()> {
    let linears = description.linears();
    for module in adapter.modules.keys() {
        if !linears.iter().any(|l| &l.module == module) {
            return Err(Error::Invalid(format!(
                "the adapter's module {module} is not a linear projection of this {} model",
                description.architecture()
            )));
        }
    }
    Ok(())
}

/// Reads and uploads tensors, counting them for the progress callback.
pub(crate) struct Loader<'l, 'c> {
    pub engine: &'l Engine,
    checkpoint: &'l Checkpoint<'c>,
    adapter: Option<&'l LoraAdapter>,
    quantize: Option<QuantizeOnLoad>,
    progress: &'l mut dyn FnMut(&LoadProgress<'_>) -> Pause,
    done: usize,
    total: usize,
    footprint: Footprint,
}

impl Loader<'_, '_> {
    async fn loaded(&mut self, name: &str, tensors: usize, bytes: u64) {
        self.done += tensors;
        self.footprint.weight_bytes += bytes;
        let pause = (self.progress)(&LoadProgress {
            tensor: name,
            done: self.done.min(self.total),
            total: self.total,
            bytes: self.footprint.weight_bytes,
        });
        pause.await;
    }

    pub(crate) async fn linear(&mut self, spec: &qlora_core::arch::LinearSpec) -> Result<Linear> {
        let lora = self.adapter.and_then(|a| {
            a.modules
                .get(&spec.module)
                .map(|pair| (pair, a.config.lora.scale() as f32))
        });
        let linear = Linear::load(self.engine, self.checkpoint, spec, self.quantize, lora)?;
        if linear.weight.parts() > 1 {
            self.footprint
                .split_tensors
                .push((spec.weight_name(), linear.weight.parts()));
        }
        self.loaded(
            &spec.weight_name(),
            1 + usize::from(spec.has_bias),
            linear.bytes(),
        )
        .await;
        Ok(linear)
    }

    pub(crate) async fn norm(&mut self, spec: &qlora_core::arch::NormSpec) -> Result<Norm> {
        let norm = Norm::load(self.engine, self.checkpoint, spec)?;
        let tensors = 1 + usize::from(spec.bias_name().is_some());
        self.loaded(&spec.weight_name(), tensors, norm.bytes())
            .await;
        Ok(norm)
    }

    /// A `[rows, cols]` matrix, split by rows where it exceeds the binding limit; an f32 one
    /// stored as bf16 when `bf16` says so.
    async fn rows(&mut self, name: &str, rows: usize, cols: usize, bf16: bool) -> Result<RowSplit> {
        let mut matrix = self.checkpoint.matrix(name, &[rows, cols])?;
        if bf16 && matrix.dtype == Dense::F32 {
            matrix = matrix.to_bf16();
        }
        let split = RowSplit::upload(self.engine, name, &matrix, cols)?;
        if split.parts.len() > 1 {
            self.footprint
                .split_tensors
                .push((name.to_string(), split.parts.len()));
        }
        self.loaded(name, 1, split.bytes()).await;
        Ok(split)
    }

    pub(crate) fn f32_table(&mut self, label: &str, values: &[f32]) -> Result<wgpu::Buffer> {
        upload_f32(self.engine, label, values)
    }
}

impl LoadedModel {
    pub fn footprint(&self) -> &Footprint {
        &self.footprint
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn vocab_size(&self) -> usize {
        self.dims.vocab
    }

    /// Tokens in the KV cache.
    pub fn cached_tokens(&self) -> usize {
        self.past
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        self.past = 0;
    }

    /// Switches the adapter loaded with the model on or off (on after a load), so that one load
    /// answers as the fine-tuned and as the base model. Takes effect from the next forward pass;
    /// the KV cache keeps what was computed before, so switch between generations.
    pub fn set_adapter_enabled(&mut self, enabled: bool) {
        self.shared.lora_enabled = enabled;
    }

    pub fn max_seq_len(&self) -> usize {
        self.dims.max_seq
    }

    pub(crate) fn chunk(&self) -> usize {
        self.dims.chunk
    }

    /// The last position's logits, the chosen token and the penalty's context ids.
    pub(crate) fn sampling_buffers(&self) -> (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer) {
        (&self.logits, &self.token, &self.context_ids)
    }

    /// Records the forward pass of `tokens` whose last position's logits are wanted.
    pub(crate) fn record_forward_last(&mut self, tokens: &[u32]) -> Result<Recorder> {
        self.record_forward(Input::Host(tokens), Outputs::LastPosition)
    }

    /// Records the forward pass of the token that the previously submitted pass chose and
    /// copied into the step buffer ([`LoadedModel::keep_choice`]), last position's logits.
    pub(crate) fn record_forward_chosen(&mut self) -> Result<Recorder> {
        self.record_forward(Input::Chosen, Outputs::LastPosition)
    }

    /// Adds to `rec` (after the choice of a token) the copy of the chosen id into the step
    /// buffer, where the next pass's embedding reads it.
    pub(crate) fn keep_choice(&self, rec: &mut Recorder) {
        rec.copy(
            &self.token,
            0,
            &self.step_buffer.buffer,
            StepBuffer::FIRST_TOKEN,
            4,
        );
    }

    /// Forgets the last cached token (a pass run ahead whose token was not wanted); its cache
    /// column is overwritten by the next pass.
    pub(crate) fn forget_last(&mut self) {
        self.past = self.past.saturating_sub(1);
    }

    /// Logits `[T, V]` (row-major) of `tokens`, the start of a new sequence (the cache is reset
    /// and then holds them).
    pub async fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::Invalid("prefill needs at least one token".into()));
        }
        self.reset();
        let mut logits = Vec::with_capacity(tokens.len() * self.dims.vocab);
        for chunk in tokens.chunks(self.dims.chunk) {
            let rec = self.record_forward(Input::Host(chunk), Outputs::AllPositions)?;
            logits.extend(self.read_f32(rec, chunk.len() * self.dims.vocab).await?);
        }
        Ok(logits)
    }

    /// Logits `[V]` of `token` after the cached ones.
    pub async fn decode_step(&mut self, token: u32) -> Result<Vec<f32>> {
        let rec = self.record_forward(Input::Host(&[token]), Outputs::LastPosition)?;
        self.read_f32(rec, self.dims.vocab).await
    }

    async fn read_f32(&self, rec: Recorder, count: usize) -> Result<Vec<f32>> {
        let bytes = submit_and_read(
            &self.engine,
            rec.into_encoder(),
            &self.logits,
            (count * 4) as u64,
        )
        .await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Records the forward pass of `input` (at most one chunk) after the cached ones; the
    /// logits land in `self.logits` (row 0 for the last position only).
    fn record_forward(&mut self, input: Input, outputs: Outputs) -> Result<Recorder> {
        let d = self.dims;
        let t = match input {
            Input::Host(tokens) => tokens.len(),
            Input::Chosen => 1,
        };
        debug_assert!(t >= 1 && t <= d.chunk);
        if self.past + t > d.max_seq {
            return Err(Error::Invalid(format!(
                "{} tokens exceed the KV cache of {} (LoadOptions::max_seq_len)",
                self.past + t,
                d.max_seq
            )));
        }
        // Takes effect at the start of the next submission, after every one before it: the
        // pass that chose an `Input::Chosen` token has written it by then.
        match input {
            Input::Host(tokens) => {
                if let Some(&token) = tokens.iter().find(|&&id| id as usize >= d.vocab) {
                    return Err(Error::Invalid(format!(
                        "token id {token} is outside the vocabulary of {}",
                        d.vocab
                    )));
                }
                self.step_buffer.write(&self.engine, self.past, tokens);
            }
            Input::Chosen => self.step_buffer.write_past(&self.engine, self.past),
        }
        let mut rec = Recorder::cached(&self.engine, &self.bindings);
        let row_bytes = (d.hidden * 4) as u64;
        for part in &self.embedding.parts {
            let lookup = LinearParams {
                n: part.rows as u32,
                k: d.hidden as u32,
                row: part.first_row as u32,
                ..Default::default()
            };
            let weight = WeightBinding::Dense(&part.buffer, self.embedding.dtype);
            rec.gather_rows(&lookup, t, &self.step_buffer, &self.shared.hidden, weight);
        }
        let step = Step {
            dims: d,
            shared: &self.shared,
            t,
            step_buffer: &self.step_buffer,
        };
        match &self.layers {
            Layers::Bloom(m) => m.record(&mut rec, &step, &self.cache),
            Layers::Llama(m) => m.record(&mut rec, &step, &self.cache),
        }
        self.final_norm
            .record(&mut rec, t, &self.shared.hidden, &self.shared.normed);
        let (x, rows) = match outputs {
            Outputs::AllPositions => (&self.shared.normed, t),
            Outputs::LastPosition => {
                rec.copy(
                    &self.shared.normed,
                    (t - 1) as u64 * row_bytes,
                    &self.last_row,
                    0,
                    row_bytes,
                );
                (&self.last_row, 1)
            }
        };
        self.lm_head.record(
            &mut rec,
            rows,
            x,
            &self.logits,
            false,
            self.shared.lora_scratch(),
        );
        self.past += t;
        Ok(rec)
    }
}
