//! A whole causal LM on the GPU: loading (frozen base packed or dense, LoRA adapters as the CPU
//! path makes them), one micro-batch's forward and backward pass, the evaluation loss, and the
//! optimizer step.

use std::sync::Arc;

use qlora_core::arch::{ArchConfig, ArchDescription, LinearSpec, LmHead, ModelConfig, RopeLayout};
use qlora_core::checkpoint::TensorSource;
use qlora_core::{Error, Result};
use qlora_kernels::{DeviceBuffer, Gemm, Gpu, Kernels, MemoryStats, Precision};

use super::attention::{CachePosition, KeyMask, LayerCache, Rope};
use super::batch::GpuBatch;
use super::blocks::{Block, BlockInputs, BloomBlock, CacheSlot, LlamaBlock, Saved};
use super::generate::{DecodeInputs, GpuKvCache};
use super::head;
use super::linear::{Ctx, Linear};
use super::lora::{InitialAdapter, LoraGradients, LoraStore};
use super::weights::{FrozenWeight, Loader, Norm};
use crate::cpu::kv_cache::{key_positions, TokenBook};
use crate::cpu::lora::{AdapterFactory, LoraSetup};
use crate::cpu::weights::Weights;
use crate::train::checkpoint::ParamSpec;
use crate::train::optimizer::{AdamW, AdamWParams};

/// How the model computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaOptions {
    /// Activations and dense frozen weights: `Bf16` for training, `F32` to check against the CPU.
    pub precision: Precision,
    /// Keep only each block's input in the forward pass and recompute the block in the backward
    /// pass (`--gradient_checkpointing`).
    pub gradient_checkpointing: bool,
}

enum Positional {
    /// BLOOM: ALiBi slopes `[nh]` (f32).
    Alibi(DeviceBuffer),
    /// LLaMA family: RoPE.
    Rope {
        inv_freq: Vec<f32>,
        head_dim: usize,
        half_split: bool,
    },
}

/// A causal LM whose LoRA adapters train on the GPU.
pub struct CudaModel {
    gpu: Gpu,
    kernels: Arc<Kernels>,
    options: CudaOptions,
    embedding: DeviceBuffer,
    /// BLOOM's `word_embeddings_layernorm`.
    embedding_norm: Option<Norm>,
    blocks: Vec<Block>,
    final_norm: Norm,
    /// `None`: tied to the embedding.
    lm_head: Option<DeviceBuffer>,
    positional: Positional,
    vocab: usize,
    hidden: usize,
    /// Dequantization target, sized for the largest projection.
    scratch: DeviceBuffer,
    lora: LoraStore,
    /// Decoding steps are recorded into a CUDA graph (see [`CudaModel::forward_cached`]).
    record_decoding: bool,
}

/// What one generation step reads: its token ids `[B * T]`, the keys' mask and positions, the
/// RoPE tables, and where its tokens go in the KV cache.
struct StepRun {
    ids: u64,
    keys: KeyMask,
    rope: Option<Rope>,
    batch: usize,
    seq: usize,
    at: CachePosition,
}

/// A projection with an adapter from `factory` when targeted; `id` seeds its dropout masks.
fn linear(
    loader: &Loader<'_>,
    spec: &LinearSpec,
    factory: Option<&mut AdapterFactory<'_>>,
    adapters: &mut Vec<InitialAdapter>,
) -> Result<Linear> {
    let lora = match factory {
        Some(f) => f.adapter(spec)?,
        None => None,
    };
    let slot = match lora {
        Some(ad) => {
            let flat = |v: &candle_core::Var| {
                v.as_tensor()
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(crate::cpu::compute_error)
            };
            adapters.push(InitialAdapter {
                module: ad.module.clone(),
                a: flat(&ad.a)?,
                b: flat(&ad.b)?,
                r: ad.a.as_tensor().dims()[0],
                in_features: spec.in_features,
                out_features: spec.out_features,
                scale: ad.scale as f32,
                dropout: ad.dropout as f32,
            });
            Some(adapters.len() - 1)
        }
        None => None,
    };
    Ok(Linear {
        weight: loader.linear_weight(spec)?,
        bias: loader.bias(spec)?,
        lora: slot,
        in_features: spec.in_features,
        out_features: spec.out_features,
        id: 0,
    })
}

impl CudaModel {
    /// Loads `config`'s model from `checkpoint` onto `gpu` (projections that the checkpoint
    /// holds 4-bit stay packed), with the adapters `lora` describes, made exactly as the CPU
    /// path makes them.
    pub fn load(
        gpu: &Gpu,
        config: &ModelConfig,
        checkpoint: &dyn TensorSource,
        lora: Option<&LoraSetup<'_>>,
        options: CudaOptions,
    ) -> Result<CudaModel> {
        let kernels = gpu.kernels(options.precision)?;
        let description = config.describe();
        let mut factory = lora
            .map(|s| AdapterFactory::new(s, &description))
            .transpose()?;
        let loader = Loader {
            gpu,
            precision: options.precision,
            weights: Weights::new(checkpoint, &description),
        };
        let mut adapters = Vec::new();
        let mut blocks = Vec::new();
        let (embedding, embedding_norm, final_norm, lm_head, positional, vocab, hidden) = match (
            &description,
            &config.arch,
        ) {
            (ArchDescription::Bloom(d), ArchConfig::Bloom(c)) => {
                if c.apply_residual_connection_post_layernorm {
                    return Err(Error::Invalid(
                        "the CUDA path does not implement apply_residual_connection_post_layernorm: use --device cpu".into(),
                    ));
                }
                check_no_dropout(c.hidden_dropout.max(c.attention_dropout))?;
                for layer in &d.layers {
                    let mut lin =
                        |s: &LinearSpec| linear(&loader, s, factory.as_mut(), &mut adapters);
                    blocks.push(Block::Bloom(Box::new(BloomBlock {
                        input_layernorm: loader.norm(&layer.input_layernorm)?,
                        query_key_value: lin(&layer.query_key_value)?,
                        dense: lin(&layer.dense)?,
                        post_attention_layernorm: loader.norm(&layer.post_attention_layernorm)?,
                        dense_h_to_4h: lin(&layer.dense_h_to_4h)?,
                        dense_4h_to_h: lin(&layer.dense_4h_to_h)?,
                        n_head: c.n_head,
                        hidden: c.hidden_size,
                    })));
                }
                (
                    loader.embedding(&d.word_embeddings)?,
                    Some(loader.norm(&d.word_embeddings_layernorm)?),
                    loader.norm(&d.ln_f)?,
                    head_table(&loader, &d.lm_head)?,
                    Positional::Alibi(gpu.upload(&c.alibi_slopes(), "ALiBi slopes")?),
                    c.vocab_size,
                    c.hidden_size,
                )
            }
            (ArchDescription::Llama(d), ArchConfig::Llama(c)) => {
                check_no_dropout(c.attention_dropout)?;
                for layer in &d.layers {
                    let mut lin =
                        |s: &LinearSpec| linear(&loader, s, factory.as_mut(), &mut adapters);
                    blocks.push(Block::Llama(Box::new(LlamaBlock {
                        input_layernorm: loader.norm(&layer.input_layernorm)?,
                        q_proj: lin(&layer.q_proj)?,
                        k_proj: lin(&layer.k_proj)?,
                        v_proj: lin(&layer.v_proj)?,
                        o_proj: lin(&layer.o_proj)?,
                        post_attention_layernorm: loader.norm(&layer.post_attention_layernorm)?,
                        gate_proj: lin(&layer.gate_proj)?,
                        up_proj: lin(&layer.up_proj)?,
                        down_proj: lin(&layer.down_proj)?,
                        heads: c.num_attention_heads,
                        kv_heads: c.num_key_value_heads,
                        head_dim: c.head_dim,
                        hidden: c.hidden_size,
                        intermediate: c.intermediate_size,
                    })));
                }
                (
                    loader.embedding(&d.embed_tokens)?,
                    None,
                    loader.norm(&d.norm)?,
                    head_table(&loader, &d.lm_head)?,
                    Positional::Rope {
                        inv_freq: c.rope_inv_freq(),
                        head_dim: c.head_dim,
                        half_split: c.rope_layout == RopeLayout::HalfSplit,
                    },
                    c.vocab_size,
                    c.hidden_size,
                )
            }
            _ => {
                return Err(Error::Invalid(
                    "model description and config disagree".into(),
                ))
            }
        };
        // Each projection gets its own dropout stream.
        let mut next_id = 0u64;
        for block in &mut blocks {
            for lin in block.linears_mut() {
                lin.id = next_id;
                next_id += 1;
            }
        }
        let largest = description
            .linears()
            .iter()
            .map(|l| l.in_features * l.out_features)
            .max()
            .unwrap_or(1);
        let scratch = gpu.alloc(
            options.precision.size() * largest,
            "dequantized weight scratch",
        )?;
        let lora = LoraStore::new(gpu, &kernels, adapters)?;
        Ok(CudaModel {
            gpu: gpu.clone(),
            kernels,
            options,
            embedding,
            embedding_norm,
            blocks,
            final_norm,
            lm_head,
            positional,
            vocab,
            hidden,
            scratch,
            lora,
            record_decoding: true,
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    pub fn options(&self) -> CudaOptions {
        self.options
    }

    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.options.gradient_checkpointing = on;
    }

    /// Trainable LoRA parameters.
    pub fn trainable_params(&self) -> usize {
        self.lora.len
    }

    /// The adapted module paths, in model order.
    pub fn lora_modules(&self) -> Vec<String> {
        self.lora.slots.iter().map(|s| s.module.clone()).collect()
    }

    pub fn memory(&self) -> Result<MemoryStats> {
        self.gpu.memory()
    }

    fn ctx(&self, train: bool, seed: u64) -> Ctx<'_> {
        Ctx {
            gpu: &self.gpu,
            k: &self.kernels,
            scratch: &self.scratch,
            lora: &self.lora,
            train,
            seed,
            weight_cache: Default::default(),
        }
    }

    /// RoPE tables `[B, T, hd]` (cos, sin) for the tokens at `positions [B * T]`, as the CPU
    /// path computes them, and the pair layout; `None` for ALiBi models.
    fn rope_tables(&self, positions: &[f32]) -> Option<(Vec<f32>, Vec<f32>, bool)> {
        let Positional::Rope {
            inv_freq,
            head_dim,
            half_split,
        } = &self.positional
        else {
            return None;
        };
        let d = *head_dim;
        let (mut cos, mut sin) = (
            Vec::with_capacity(positions.len() * d),
            Vec::with_capacity(positions.len() * d),
        );
        for &position in positions {
            for c in 0..d {
                let pair = if *half_split { c % (d / 2) } else { c / 2 };
                let angle = f64::from(position * inv_freq[pair]);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Some((cos, sin, *half_split))
    }

    /// The RoPE tables of [`CudaModel::rope_tables`] on the device (one buffer: cos, then sin).
    fn rope(&self, positions: &[f32]) -> Result<Option<(DeviceBuffer, Rope)>> {
        self.upload_rope(self.rope_tables(positions))
    }

    /// `tables` from [`CudaModel::rope_tables`] on the device.
    fn upload_rope(
        &self,
        tables: Option<(Vec<f32>, Vec<f32>, bool)>,
    ) -> Result<Option<(DeviceBuffer, Rope)>> {
        let Some((mut cos, sin, half_split)) = tables else {
            return Ok(None);
        };
        let len = cos.len();
        cos.extend(sin);
        let tables = self.gpu.upload(&cos, "RoPE tables")?;
        let rope = Rope {
            cos: tables.ptr(),
            sin: tables.at(4 * len),
            half_split,
        };
        Ok(Some((tables, rope)))
    }

    fn alibi_slopes(&self) -> Option<&DeviceBuffer> {
        match &self.positional {
            Positional::Alibi(s) => Some(s),
            Positional::Rope { .. } => None,
        }
    }

    /// The blocks' inputs for a training or evaluation batch.
    fn batch_inputs(&self, batch: &GpuBatch, rope: Option<Rope>) -> BlockInputs<'_> {
        BlockInputs {
            batch_size: batch.batch_size,
            seq_len: batch.seq_len,
            keys: KeyMask {
                mask: batch.key_mask.ptr(),
                positions: batch.positions.ptr(),
                stride: batch.seq_len,
            },
            alibi_slopes: self.alibi_slopes(),
            rope,
        }
    }

    /// The embedded (and for BLOOM normalized) input `[N, H]`.
    fn embed(&self, ctx: &Ctx<'_>, ids: u64, n: usize) -> Result<DeviceBuffer> {
        let x = ctx.act(n * self.hidden, "embeddings")?;
        self.kernels
            .embedding(ids, self.embedding.ptr(), x.ptr(), n, self.hidden)?;
        match &self.embedding_norm {
            Some(norm) => Ok(norm.forward(ctx, x.ptr(), n)?.out),
            None => Ok(x),
        }
    }

    fn head_table(&self) -> u64 {
        self.lm_head.as_ref().unwrap_or(&self.embedding).ptr()
    }

    /// One micro-batch: the mean loss, with the LoRA gradients of `grad_scale * loss` added
    /// into the gradient buffers. `seed` draws this micro-batch's dropout masks.
    pub fn forward_backward(&self, batch: &GpuBatch, grad_scale: f32, seed: u64) -> Result<f64> {
        let ctx = self.ctx(true, seed);
        let rope = self.rope(&batch.token_positions)?;
        let inputs = self.batch_inputs(batch, rope.as_ref().map(|r| r.1));
        let n = batch.tokens();
        // Block inputs x_0..x_L (x_L is the last block's output).
        let mut xs = vec![self.embed(&ctx, batch.ids.ptr(), n)?];
        let mut saved: Vec<Option<Saved>> = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let out = ctx.act(n * self.hidden, "block output")?;
            let s = block.forward(
                &ctx,
                &inputs,
                xs.last().expect("x_0 exists").ptr(),
                out.ptr(),
                None,
            )?;
            saved.push((!self.options.gradient_checkpointing).then_some(s));
            xs.push(out);
        }
        let last = xs.last().expect("x_0 exists").ptr();
        let normed = self.final_norm.forward(&ctx, last, n)?;
        let dnormed = ctx.act(n * self.hidden, "head gradient")?;
        let loss = head::loss_and_grad(
            &ctx,
            normed.out.ptr(),
            self.head_table(),
            self.vocab,
            self.hidden,
            batch,
            Some(dnormed.ptr()),
            grad_scale,
        )?;
        let grad = ctx.act(n * self.hidden, "residual gradient")?;
        self.final_norm
            .backward(&ctx, last, &normed, dnormed.ptr(), grad.ptr(), n, false)?;
        drop((normed, dnormed));
        for (i, block) in self.blocks.iter().enumerate().rev() {
            let x = xs[i].ptr();
            let s = match saved[i].take() {
                Some(s) => s,
                None => {
                    // Recompute the block; its output is not needed again. Its weights stay
                    // dequantized for the backward pass that follows.
                    ctx.begin_weight_cache();
                    let scratch_out = ctx.act(n * self.hidden, "recomputed block output")?;
                    block.forward(&ctx, &inputs, x, scratch_out.ptr(), None)?
                }
            };
            block.backward(&ctx, &inputs, x, &s, grad.ptr(), i > 0)?;
            ctx.end_weight_cache();
            xs.truncate(i + 1);
        }
        Ok(loss)
    }

    /// The mean loss of `batch` without dropout or gradients.
    pub fn loss(&self, batch: &GpuBatch) -> Result<f64> {
        let ctx = self.ctx(false, 0);
        let rope = self.rope(&batch.token_positions)?;
        let inputs = self.batch_inputs(batch, rope.as_ref().map(|r| r.1));
        let n = batch.tokens();
        let mut x = self.embed(&ctx, batch.ids.ptr(), n)?;
        for block in &self.blocks {
            let out = ctx.act(n * self.hidden, "block output")?;
            block.forward(&ctx, &inputs, x.ptr(), out.ptr(), None)?;
            x = out;
        }
        let normed = self.final_norm.forward(&ctx, x.ptr(), n)?;
        head::loss_and_grad(
            &ctx,
            normed.out.ptr(),
            self.head_table(),
            self.vocab,
            self.hidden,
            batch,
            None,
            1.0,
        )
    }

    /// Bytes of frozen weights one decoding step reads: every projection (4-bit codes and
    /// absmax, or dense) and the LM head; the floor of a decoding step is this over the card's
    /// bandwidth.
    pub fn decode_bytes_per_token(&self) -> usize {
        let projections: usize = self
            .blocks
            .iter()
            .flat_map(Block::linears)
            .map(|lin| match &lin.weight {
                FrozenWeight::Packed(q) => q.bytes(),
                FrozenWeight::Dense(d) => d.bytes(),
            })
            .sum();
        let head = self.lm_head.as_ref().unwrap_or(&self.embedding).bytes();
        projections + head
    }

    /// An empty KV cache for `batch` sequences of up to `capacity` tokens each.
    pub fn kv_cache(&self, batch: usize, capacity: usize) -> Result<GpuKvCache> {
        let layers = self
            .blocks
            .iter()
            .map(|block| {
                let (kv_heads, hd) = block.kv_shape();
                let len = batch * kv_heads * capacity * hd;
                Ok(LayerCache {
                    k: self.gpu.alloc(self.kernels.bytes(len), "the KV cache")?,
                    v: self.gpu.alloc(self.kernels.bytes(len), "the KV cache")?,
                })
            })
            .collect::<Result<_>>()?;
        let rope_dim = match &self.positional {
            Positional::Rope { head_dim, .. } => *head_dim,
            Positional::Alibi(_) => 0,
        };
        Ok(GpuKvCache {
            layers,
            capacity,
            book: TokenBook::new(batch),
            inputs: DecodeInputs::new(&self.gpu, batch, capacity, rope_dim)?,
            logits: self.gpu.alloc(4 * batch * self.vocab, "logits")?,
            recorded_step: None,
            record: self.record_decoding,
        })
    }

    /// Records decoding steps into a CUDA graph (the default) or launches every kernel of every
    /// step from the host (`false`: to measure what recording gains).
    pub fn set_record_decoding(&mut self, record: bool) {
        self.record_decoding = record;
    }

    /// Feeds `ids [B, T]` (`key_mask [B, T]`: 1 real, 0 padding) after the tokens in `cache`
    /// and returns each row's last-position logits `[B, vocab]` (f32, on the device, in the
    /// cache). No dropout, no autograd state: generation. A decoding step (one token per row
    /// after the prompts) is recorded once into a CUDA graph and replayed after that: its inputs
    /// are written where the recorded kernels read them.
    pub fn forward_cached<'c>(
        &self,
        ids: &[u32],
        key_mask: &[f32],
        cache: &'c mut GpuKvCache,
    ) -> Result<&'c DeviceBuffer> {
        let b = cache.book.batch_size();
        let t = ids.len() / b.max(1);
        if ids.len() != b * t || key_mask.len() != b * t || t == 0 {
            return Err(Error::Invalid(format!(
                "a generation step of {} ids for {b} sequences",
                ids.len()
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab
            )));
        }
        let past = cache.book.len();
        if past + t > cache.capacity {
            return Err(Error::Invalid(format!(
                "the KV cache holds {} tokens per sequence: {past} cached + {t} new do not fit",
                cache.capacity
            )));
        }
        let step = cache.book.begin_step(key_mask, t)?;
        // Key positions matter only to ALiBi.
        let positions = self
            .alibi_slopes()
            .map(|_| key_positions(&step.key_mask, b));
        let query_positions: Vec<f32> = step.positions.iter().map(|&p| p as f32).collect();
        let rope = self.rope_tables(&query_positions);
        let at = |past_len| CachePosition {
            past,
            past_len,
            capacity: cache.capacity,
        };
        if t == 1 && past > 0 && cache.record {
            let inputs = &cache.inputs;
            inputs.write(
                &self.gpu,
                past,
                ids,
                &step.key_mask,
                positions.as_deref(),
                rope,
            )?;
            let run = StepRun {
                ids: inputs.ids(),
                keys: inputs.keys(),
                rope: inputs.rope(self.rope_layout()),
                batch: b,
                seq: 1,
                at: at(inputs.past_len()),
            };
            if cache.recorded_step.is_none() {
                let recorded = self
                    .gpu
                    .record(|| self.run_step(&run, &cache.layers, cache.logits.ptr()));
                match recorded {
                    Ok(r) => cache.recorded_step = Some(r),
                    Err(e) => {
                        // Launched one kernel at a time from now on: slower, not wrong.
                        tracing::warn!("decoding steps are not recorded into a CUDA graph: {e}");
                        cache.record = false;
                        self.run_step(&run, &cache.layers, cache.logits.ptr())?;
                        return Ok(&cache.logits);
                    }
                }
            }
            let recorded = cache.recorded_step.as_ref().expect("recorded above");
            recorded.launch()?;
            return Ok(&cache.logits);
        }
        cache.inputs.write_past(&self.gpu, past)?;
        let mask = self.gpu.upload(&step.key_mask, "the attention mask")?;
        let positions = positions
            .map(|p| self.gpu.upload(&p, "ALiBi positions"))
            .transpose()?;
        let ids_on_device = self.gpu.upload(ids, "token ids")?;
        let rope = self.upload_rope(rope)?;
        let run = StepRun {
            ids: ids_on_device.ptr(),
            keys: KeyMask {
                mask: mask.ptr(),
                positions: positions.as_ref().map_or(0, |p| p.ptr()),
                stride: past + t,
            },
            rope: rope.as_ref().map(|r| r.1),
            batch: b,
            seq: t,
            at: at(cache.inputs.past_len()),
        };
        self.run_step(&run, &cache.layers, cache.logits.ptr())?;
        Ok(&cache.logits)
    }

    /// The pair layout of RoPE models.
    fn rope_layout(&self) -> Option<bool> {
        match &self.positional {
            Positional::Rope { half_split, .. } => Some(*half_split),
            Positional::Alibi(_) => None,
        }
    }

    /// The device work of one generation step (recordable: no host copies, no synchronization,
    /// every buffer it allocates freed before it returns): `run.seq` new tokens per row through
    /// every block into the KV cache `layers`, each row's last-position logits into `logits`.
    fn run_step(&self, run: &StepRun, layers: &[LayerCache], logits: u64) -> Result<()> {
        let (b, t) = (run.batch, run.seq);
        let ctx = self.ctx(false, 0);
        let inputs = BlockInputs {
            batch_size: b,
            seq_len: t,
            keys: run.keys,
            alibi_slopes: self.alibi_slopes(),
            rope: run.rope,
        };
        let n = b * t;
        let mut x = self.embed(&ctx, run.ids, n)?;
        for (block, layer) in self.blocks.iter().zip(layers) {
            let out = ctx.act(n * self.hidden, "block output")?;
            let slot = CacheSlot { layer, at: run.at };
            block.forward(&ctx, &inputs, x.ptr(), out.ptr(), Some(slot))?;
            x = out;
        }
        // Only each row's last position goes on.
        let last = if t == 1 {
            x
        } else {
            let rows = ctx.act(b * self.hidden, "last positions")?;
            let row_bytes = self.kernels.bytes(self.hidden);
            for row in 0..b {
                self.gpu.copy(
                    rows.at(row * row_bytes),
                    x.at(((row + 1) * t - 1) * row_bytes),
                    row_bytes,
                )?;
            }
            rows
        };
        let normed = self.final_norm.forward(&ctx, last.ptr(), b)?;
        let (x, table) = (normed.out.ptr(), self.head_table());
        if self.kernels.gemv_dense_serves(b, self.hidden, table, x) {
            return self
                .kernels
                .gemv_dense(table, x, logits, b, self.hidden, self.vocab);
        }
        self.gpu.gemm(&Gemm::new(
            b,
            self.vocab,
            self.hidden,
            x,
            false,
            table,
            true,
            logits,
            self.options.precision,
            Precision::F32,
        ))
    }

    /// Folds each adapter into a dense copy of its frozen weight (the 4-bit base dequantized,
    /// plus `scale B A`), for generation: one product per projection instead of three, at the
    /// cost of the adapted projections' weights in the activation precision (4x their 4-bit
    /// size in bf16).
    fn merge_adapters(&mut self) -> Result<()> {
        let ctx_gpu = self.gpu.clone();
        for block in &mut self.blocks {
            for lin in block.linears_mut() {
                let Some(slot) = lin.lora.take() else {
                    continue;
                };
                let (o, i) = (lin.out_features, lin.in_features);
                let dense = ctx_gpu.alloc(self.kernels.bytes(o * i), "a merged weight")?;
                match &lin.weight {
                    FrozenWeight::Packed(q) => self.kernels.dequantize(q, dense.ptr())?,
                    FrozenWeight::Dense(d) => ctx_gpu.copy(dense.ptr(), d.ptr(), d.bytes())?,
                }
                let s = &self.lora.slots[slot];
                let p = self.options.precision;
                ctx_gpu.gemm(
                    &Gemm::new(
                        o,
                        i,
                        s.r,
                        self.lora.b(slot),
                        false,
                        self.lora.a(slot),
                        false,
                        dense.ptr(),
                        p,
                        p,
                    )
                    .alpha(s.scale)
                    .accumulate(),
                )?;
                lin.weight = FrozenWeight::Dense(dense);
            }
        }
        Ok(())
    }

    /// Readies the model for generation, once after loading: with `merge_adapters` the adapters
    /// are folded into their weights first (see `merge_adapters`), then the 4-bit projections
    /// left are readied for decoding (see `Kernels::prepare_gemv`: the double-quantized absmax
    /// codes in the tensor-core GEMV's order). Training does not need it.
    pub fn prepare_decoding(&mut self, merge_adapters: bool) -> Result<()> {
        if merge_adapters {
            self.merge_adapters()?;
        }
        for block in &mut self.blocks {
            for lin in block.linears_mut() {
                if let FrozenWeight::Packed(q) = &mut lin.weight {
                    self.kernels.prepare_gemv(&self.gpu, q)?;
                }
            }
        }
        Ok(())
    }

    pub fn zero_grad(&self) -> Result<()> {
        self.lora.zero_grad(&self.gpu)
    }

    /// The device address and length of the flat f32 buffer of every LoRA gradient.
    pub(crate) fn gradient_buffer(&self) -> (u64, usize) {
        (self.lora.grad.ptr(), self.lora.len)
    }

    /// Global gradient norm before clipping to `max_norm` (`<= 0`: no clipping).
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<f64> {
        self.lora.clip_grad_norm(&self.gpu, &self.kernels, max_norm)
    }

    pub fn adamw_step(&mut self, params: AdamWParams, lr: f64) -> Result<()> {
        self.lora.adamw_step(&self.kernels, params, lr)
    }

    /// The gradients of every adapter, as accumulated since [`CudaModel::zero_grad`].
    pub fn lora_gradients(&self) -> Result<Vec<LoraGradients>> {
        self.lora.gradients(&self.gpu)
    }

    /// The adapters' fp32 values as PEFT pairs.
    pub fn lora_pairs(&self) -> Result<Vec<(String, qlora_core::peft::LoraPair)>> {
        self.lora.pairs(&self.gpu)
    }

    /// The trained matrices: A then B of each adapter, in model order.
    pub fn lora_parameters(&self) -> Vec<ParamSpec> {
        self.lora.param_specs()
    }

    /// AdamW's step count and moments, per parameter of [`CudaModel::lora_parameters`].
    pub fn adamw_state(&self) -> Result<AdamW> {
        self.lora.optimizer_state(&self.gpu)
    }

    /// Sets the adapters' fp32 values and AdamW's state, per parameter of
    /// [`CudaModel::lora_parameters`] (as a checkpoint saved them).
    pub fn restore_lora(&mut self, weights: &[Vec<f32>], optimizer: &AdamW) -> Result<()> {
        self.lora
            .restore(&self.gpu, &self.kernels, weights, optimizer)
    }

    /// Whether every adapter value is finite.
    pub fn lora_finite(&self) -> Result<bool> {
        self.lora.weights_finite(&self.gpu, &self.kernels)
    }
}

fn head_table(loader: &Loader<'_>, head: &LmHead) -> Result<Option<DeviceBuffer>> {
    match head {
        LmHead::TiedToEmbedding => Ok(None),
        LmHead::Separate(spec) => Ok(Some(loader.embedding(spec)?)),
    }
}

fn check_no_dropout(p: f64) -> Result<()> {
    if p > 0.0 {
        return Err(Error::Invalid(format!(
            "the CUDA path implements LoRA dropout only, not the model's own attention/hidden dropout ({p}): use --device cpu"
        )));
    }
    Ok(())
}
