//! A whole causal LM on the GPU: loading (frozen base packed or dense, LoRA adapters as the CPU
//! path makes them), one micro-batch's forward and backward pass, the evaluation loss, and the
//! optimizer step.

use std::sync::Arc;

use qlora_core::arch::{ArchConfig, ArchDescription, LinearSpec, LmHead, ModelConfig, RopeLayout};
use qlora_core::checkpoint::TensorSource;
use qlora_core::{Error, Result};
use qlora_kernels::{DeviceBuffer, Gpu, Kernels, MemoryStats, Precision};

use super::batch::GpuBatch;
use super::blocks::{Block, BlockInputs, BloomBlock, LlamaBlock, Saved};
use super::head;
use super::linear::{Ctx, Linear};
use super::lora::{InitialAdapter, LoraGradients, LoraStore};
use super::weights::{Loader, Norm};
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
            for lin in block_linears_mut(block) {
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
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
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

    /// RoPE tables `[T, hd]` as the CPU path computes them (positions `0..T`).
    fn rope_tables(&self, seq: usize) -> Result<Option<(DeviceBuffer, DeviceBuffer, bool)>> {
        let Positional::Rope {
            inv_freq,
            head_dim,
            half_split,
        } = &self.positional
        else {
            return Ok(None);
        };
        let d = *head_dim;
        let (mut cos, mut sin) = (Vec::with_capacity(seq * d), Vec::with_capacity(seq * d));
        for position in 0..seq {
            for c in 0..d {
                let pair = if *half_split { c % (d / 2) } else { c / 2 };
                let angle = f64::from(position as f32 * inv_freq[pair]);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Some((
            self.gpu.upload(&cos, "RoPE table")?,
            self.gpu.upload(&sin, "RoPE table")?,
            *half_split,
        )))
    }

    /// The embedded (and for BLOOM normalized) input `[N, H]`.
    fn embed(&self, ctx: &Ctx<'_>, batch: &GpuBatch) -> Result<DeviceBuffer> {
        let n = batch.tokens();
        let x = ctx.act(n * self.hidden, "embeddings")?;
        self.kernels.embedding(
            batch.ids.ptr(),
            self.embedding.ptr(),
            x.ptr(),
            n,
            self.hidden,
        )?;
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
        let rope = self.rope_tables(batch.seq_len)?;
        let inputs = BlockInputs {
            batch,
            alibi_slopes: match &self.positional {
                Positional::Alibi(s) => Some(s),
                Positional::Rope { .. } => None,
            },
            rope: rope.as_ref().map(|(c, s, h)| (c, s, *h)),
        };
        let n = batch.tokens();
        // Block inputs x_0..x_L (x_L is the last block's output).
        let mut xs = vec![self.embed(&ctx, batch)?];
        let mut saved: Vec<Option<Saved>> = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let out = ctx.act(n * self.hidden, "block output")?;
            let s = block.forward(
                &ctx,
                &inputs,
                xs.last().expect("x_0 exists").ptr(),
                out.ptr(),
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
                    block.forward(&ctx, &inputs, x, scratch_out.ptr())?
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
        let rope = self.rope_tables(batch.seq_len)?;
        let inputs = BlockInputs {
            batch,
            alibi_slopes: match &self.positional {
                Positional::Alibi(s) => Some(s),
                Positional::Rope { .. } => None,
            },
            rope: rope.as_ref().map(|(c, s, h)| (c, s, *h)),
        };
        let n = batch.tokens();
        let mut x = self.embed(&ctx, batch)?;
        for block in &self.blocks {
            let out = ctx.act(n * self.hidden, "block output")?;
            block.forward(&ctx, &inputs, x.ptr(), out.ptr())?;
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

    pub fn zero_grad(&self) -> Result<()> {
        self.lora.zero_grad(&self.gpu)
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

fn block_linears_mut(block: &mut Block) -> Vec<&mut Linear> {
    match block {
        Block::Bloom(b) => vec![
            &mut b.query_key_value,
            &mut b.dense,
            &mut b.dense_h_to_4h,
            &mut b.dense_4h_to_h,
        ],
        Block::Llama(b) => vec![
            &mut b.q_proj,
            &mut b.k_proj,
            &mut b.v_proj,
            &mut b.o_proj,
            &mut b.gate_proj,
            &mut b.up_proj,
            &mut b.down_proj,
        ],
    }
}
