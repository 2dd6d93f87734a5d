//! The WGSL kernels (`shaders/wgsl/`), compiled once per device, and one recording function
//! per kernel. Each function checks nothing the caller cannot get wrong silently: shapes come
//! from the model, which the loader checked.
//!
//! A decoding step is ~300 dispatches, so recording one must be cheap: consecutive dispatches
//! share one compute pass (wgpu puts a barrier between two dispatches of a pass wherever the
//! second touches what the first wrote: each dispatch is its own usage scope, and on Vulkan a
//! storage read_write use never skips its barrier), and a [`BindingCache`] keeps the bind
//! groups, with their parameter buffers, of every dispatch whose parameters stay the same from
//! step to step (what changes lives in the step buffer, [`StepBuffer`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytemuck::{Pod, Zeroable};
use qlora_core::quant::{codebook, dynamic_map_signed, QuantType};

use crate::buffers::{scratch, uniform, Dense};
use crate::device::Engine;

const STEP: &str = include_str!("../wgsl/step.wgsl");
const LINEAR_PARAMS: &str = include_str!("../wgsl/linear_params.wgsl");
const LINEAR: &str = include_str!("../wgsl/linear.wgsl");
const MATVEC: &str = include_str!("../wgsl/matvec.wgsl");
const MATVEC_Q4: &str = include_str!("../wgsl/matvec_q4.wgsl");
const MATVEC_DENSE: &str = include_str!("../wgsl/matvec_dense.wgsl");
const WEIGHTS_DENSE: &str = include_str!("../wgsl/weights_dense.wgsl");
const WEIGHTS_Q4: &str = include_str!("../wgsl/weights_q4.wgsl");
const NORM: &str = include_str!("../wgsl/norm.wgsl");
const ACTIVATIONS: &str = include_str!("../wgsl/activations.wgsl");
const ATTENTION: &str = include_str!("../wgsl/attention.wgsl");
const SAMPLING: &str = include_str!("../wgsl/sampling.wgsl");

/// Where each code book starts in the tables buffer (`weights_q4.wgsl`).
pub(crate) fn code_table(quant_type: QuantType) -> u32 {
    match quant_type {
        QuantType::Nf4 => 0,
        QuantType::Fp4 => 16,
    }
}

/// The entry points of linear.wgsl and the format's matvec for one weight format.
#[derive(Clone)]
pub(crate) struct LinearPipelines {
    pub matvec: wgpu::ComputePipeline,
    pub matmul: wgpu::ComputePipeline,
    pub unpack: wgpu::ComputePipeline,
    pub gather_rows: wgpu::ComputePipeline,
}

#[derive(Clone)]
pub(crate) struct Kernels {
    pub q4: LinearPipelines,
    /// By [`Dense`] dtype: f32, f16, bf16.
    pub dense: [LinearPipelines; 3],
    pub layer_norm: wgpu::ComputePipeline,
    pub rms_norm: wgpu::ComputePipeline,
    pub gelu_tanh: wgpu::ComputePipeline,
    pub silu_mul: wgpu::ComputePipeline,
    pub rope: wgpu::ComputePipeline,
    pub kv_append: wgpu::ComputePipeline,
    pub attention: wgpu::ComputePipeline,
    pub repetition_penalty: wgpu::ComputePipeline,
    pub argmax: wgpu::ComputePipeline,
    pub sample: wgpu::ComputePipeline,
    /// NF4 code book, FP4 code book, then the signed dynamic map of double quantization.
    pub tables: wgpu::Buffer,
    /// Bound where a kernel's optional input (a bias) is absent.
    pub no_bias: wgpu::Buffer,
}

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device) -> Kernels {
        let module = |label: &str, source: String| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            })
        };
        let specialized = |module: &wgpu::ShaderModule, entry: &str, constants: &[(&str, f64)]| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            })
        };
        let pipeline = |module: &wgpu::ShaderModule, entry: &str| specialized(module, entry, &[]);
        // Two modules per format: linear.wgsl declares x as f32 elements, matvec.wgsl as
        // 16-byte loads.
        let linear = |name: &str, weights: &str, matvec: &str, constants: &[(&str, f64)]| {
            let tiled = module(
                name,
                format!("{STEP}\n{LINEAR_PARAMS}\n{weights}\n{LINEAR}"),
            );
            let wide = module(
                name,
                format!("{LINEAR_PARAMS}\n{weights}\n{MATVEC}\n{matvec}"),
            );
            LinearPipelines {
                matvec: specialized(&wide, "matvec", constants),
                matmul: specialized(&tiled, "matmul", constants),
                unpack: specialized(&tiled, "unpack", constants),
                gather_rows: specialized(&tiled, "gather_rows", constants),
            }
        };
        let norm = module("norm", NORM.into());
        let activations = module("activations", ACTIVATIONS.into());
        let attention = module("attention", format!("{STEP}\n{ATTENTION}"));
        let sampling = module("sampling", SAMPLING.into());
        let mut tables: Vec<f32> = Vec::with_capacity(32 + 256);
        tables.extend(codebook(QuantType::Nf4));
        tables.extend(codebook(QuantType::Fp4));
        tables.extend(dynamic_map_signed());
        let tables = wgpu::util::DeviceExt::create_buffer_init(
            device,
            &wgpu::util::BufferInitDescriptor {
                label: Some("4-bit code tables"),
                contents: bytemuck::cast_slice(&tables),
                usage: wgpu::BufferUsages::STORAGE,
            },
        );
        Kernels {
            q4: linear("linear q4", WEIGHTS_Q4, MATVEC_Q4, &[]),
            dense: [Dense::F32, Dense::F16, Dense::Bf16].map(|d| {
                let constants = [("DTYPE", f64::from(d.shader_code()))];
                linear("linear dense", WEIGHTS_DENSE, MATVEC_DENSE, &constants)
            }),
            layer_norm: pipeline(&norm, "layer_norm"),
            rms_norm: pipeline(&norm, "rms_norm"),
            gelu_tanh: pipeline(&activations, "gelu_tanh"),
            silu_mul: pipeline(&activations, "silu_mul"),
            rope: pipeline(&attention, "rope"),
            kv_append: pipeline(&attention, "kv_append"),
            attention: pipeline(&attention, "attention"),
            repetition_penalty: pipeline(&sampling, "repetition_penalty"),
            argmax: pipeline(&sampling, "argmax"),
            sample: pipeline(&sampling, "sample"),
            tables,
            no_bias: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("no bias"),
                size: 4,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }),
        }
    }
}

/// `LinearParams` of linear.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
pub(crate) struct LinearParams {
    pub rows: u32,
    pub n: u32,
    pub k: u32,
    pub x_stride: u32,
    pub y_stride: u32,
    pub y_offset: u32,
    pub flags: u32,
    pub scale: f32,
    /// `gather_rows` only: the first row of this part of the embedding.
    pub row: u32,
}

pub(crate) const ACCUMULATE: u32 = 1;
pub(crate) const HAS_BIAS: u32 = 2;

/// `Q4Params` of weights_q4.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct Q4Params {
    pub blocksize: u32,
    pub double_quant: u32,
    pub nested_blocksize: u32,
    pub round_to: u32,
    pub code_table: u32,
    pub absmax_start: u32,
    pub nested_start: u32,
    pub offset: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct NormParams {
    pub dim: u32,
    pub eps: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct ActParams {
    pub n: u32,
}

/// `AttnParams` of attention.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
pub(crate) struct AttnParams {
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub t: u32,
    pub max_seq: u32,
    pub row_stride: u32,
    pub head_stride: u32,
    pub offset: u32,
    pub v_offset: u32,
    pub rope_adjacent: u32,
    pub alibi: u32,
    pub scale: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct SampleParams {
    pub n: u32,
    pub context_len: u32,
    pub top_k: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub penalty: f32,
    pub u: f32,
}

/// What changes from one forward pass to the next, in the buffer step.wgsl describes: the
/// tokens already cached and the ids of the new tokens. Written with `queue.write_buffer` when a
/// pass is recorded, which takes effect at the start of the next submission: a pass must be
/// submitted before the next one is recorded.
pub(crate) struct StepBuffer {
    pub buffer: wgpu::Buffer,
}

impl StepBuffer {
    /// A step buffer for passes of up to `chunk` tokens.
    pub(crate) fn new(engine: &Engine, chunk: usize) -> qlora_core::Result<StepBuffer> {
        Ok(StepBuffer {
            buffer: scratch(engine, "step", 1 + chunk)?,
        })
    }

    /// The byte offset of the first token id (after the number of cached tokens).
    pub(crate) const FIRST_TOKEN: u64 = 4;

    pub(crate) fn write(&self, engine: &Engine, past: usize, tokens: &[u32]) {
        let mut words = Vec::with_capacity(1 + tokens.len());
        words.push(past as u32);
        words.extend_from_slice(tokens);
        engine
            .queue
            .write_buffer(&self.buffer, 0, bytemuck::cast_slice(&words));
    }

    /// Writes the number of cached tokens only: the token id is already on the device (copied
    /// there by the pass that chose it).
    pub(crate) fn write_past(&self, engine: &Engine, past: usize) {
        engine
            .queue
            .write_buffer(&self.buffer, 0, bytemuck::bytes_of(&(past as u32)));
    }
}

/// A resource of a dispatch: a buffer, or parameters (uploaded as a uniform buffer).
enum Resource<'a> {
    Buffer(&'a wgpu::Buffer),
    Params(Vec<u8>),
}

fn uniform_of<T: Pod>(value: &T) -> Resource<'static> {
    Resource::Params(bytemuck::bytes_of(value).to_vec())
}

/// A dispatch's bind group by what it binds: the pipeline, then each binding's buffer or
/// parameter bytes.
#[derive(PartialEq, Eq, Hash)]
struct BindingKey {
    pipeline: wgpu::ComputePipeline,
    bindings: Vec<(u32, KeyResource)>,
}

#[derive(PartialEq, Eq, Hash)]
enum KeyResource {
    Buffer(wgpu::Buffer),
    Params(Vec<u8>),
}

/// The bind groups (and their parameter buffers) of a model's dispatches, built on first use and
/// reused by every later step. Its size is bounded by the model: at most one entry per dispatch
/// of a forward pass for each number of new tokens (1 ..= chunk) and adapter state; dispatches
/// whose parameters change every step (sampling) are not cached. Holds the model's buffers, so
/// it lives as long as the model.
#[derive(Clone, Default)]
pub(crate) struct BindingCache(Arc<Mutex<HashMap<BindingKey, wgpu::BindGroup>>>);

/// Whether a dispatch's bind group may be cached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reuse {
    EveryStep,
    ThisStepOnly,
}

/// The weight of a linear dispatch: a full-precision matrix, or a 4-bit one with its parameters.
pub(crate) enum WeightBinding<'a> {
    Dense(&'a wgpu::Buffer, Dense),
    Q4(&'a wgpu::Buffer, &'a Q4Params),
}

impl<'a> WeightBinding<'a> {
    /// The pipelines of this weight's format, and its bindings from 4 on.
    fn resolve<'e>(&self, kernels: &'e Kernels) -> (&'e LinearPipelines, Vec<(u32, Resource<'e>)>)
    where
        'a: 'e,
    {
        match *self {
            WeightBinding::Dense(w, dtype) => (
                &kernels.dense[dtype as usize],
                vec![(4, Resource::Buffer(w))],
            ),
            WeightBinding::Q4(w, q) => (
                &kernels.q4,
                vec![
                    (4, uniform_of(q)),
                    (5, Resource::Buffer(w)),
                    (6, Resource::Buffer(&kernels.tables)),
                ],
            ),
        }
    }
}

/// Records dispatches into one command encoder, consecutive ones in one compute pass.
pub(crate) struct Recorder {
    pub engine: Engine,
    encoder: wgpu::CommandEncoder,
    pass: Option<wgpu::ComputePass<'static>>,
    cache: Option<BindingCache>,
}

/// Workgroups for `count` along x, wrapping into y past the per-dimension limit (the kernels
/// flatten (x, y) back with `num_workgroups`).
fn grid(engine: &Engine, count: usize) -> (u32, u32) {
    let max = engine.report().max_compute_workgroups_per_dimension.max(1) as usize;
    let count = count.max(1);
    if count <= max {
        (count as u32, 1)
    } else {
        (max as u32, count.div_ceil(max) as u32)
    }
}

/// Output features per workgroup of the matvec kernels (matvec.wgsl's ROWS).
const MATVEC_ROWS: usize = 8;

impl Recorder {
    /// A recorder that builds every bind group afresh (one-off work, tests).
    pub(crate) fn new(engine: &Engine) -> Recorder {
        let encoder = engine
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        Recorder {
            engine: engine.clone(),
            encoder,
            pass: None,
            cache: None,
        }
    }

    /// A recorder that takes bind groups from, and adds them to, `cache`.
    pub(crate) fn cached(engine: &Engine, cache: &BindingCache) -> Recorder {
        Recorder {
            cache: Some(cache.clone()),
            ..Recorder::new(engine)
        }
    }

    /// The recorded commands, the open compute pass ended.
    pub(crate) fn into_encoder(mut self) -> wgpu::CommandEncoder {
        self.pass = None;
        self.encoder
    }

    fn bind_group(
        &self,
        pipeline: &wgpu::ComputePipeline,
        bindings: &[(u32, Resource<'_>)],
    ) -> wgpu::BindGroup {
        let buffers: Vec<(u32, wgpu::Buffer)> = bindings
            .iter()
            .map(|(binding, resource)| {
                let buffer = match resource {
                    Resource::Buffer(b) => (*b).clone(),
                    Resource::Params(bytes) => uniform(&self.engine, bytes),
                };
                (*binding, buffer)
            })
            .collect();
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .map(|(binding, buffer)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: buffer.as_entire_binding(),
            })
            .collect();
        self.engine
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            })
    }

    fn dispatch(
        &mut self,
        pipeline: &wgpu::ComputePipeline,
        bindings: &[(u32, Resource<'_>)],
        groups: (u32, u32),
        reuse: Reuse,
    ) {
        let bind_group = match (&self.cache, reuse) {
            (Some(cache), Reuse::EveryStep) => {
                let key = BindingKey {
                    pipeline: pipeline.clone(),
                    bindings: bindings
                        .iter()
                        .map(|(i, r)| {
                            let r = match r {
                                Resource::Buffer(b) => KeyResource::Buffer((*b).clone()),
                                Resource::Params(bytes) => KeyResource::Params(bytes.clone()),
                            };
                            (*i, r)
                        })
                        .collect(),
                };
                let mut groups = cache.0.lock().unwrap_or_else(|e| e.into_inner());
                match groups.get(&key) {
                    Some(group) => group.clone(),
                    None => {
                        let group = self.bind_group(pipeline, bindings);
                        groups.insert(key, group.clone());
                        group
                    }
                }
            }
            _ => self.bind_group(pipeline, bindings),
        };
        let encoder = &mut self.encoder;
        let pass = self.pass.get_or_insert_with(|| {
            encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor::default())
                .forget_lifetime()
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, 1);
    }

    /// A dispatch of one of the engine's fixed pipelines, reused every step.
    fn run(
        &mut self,
        pipeline: impl Fn(&Kernels) -> &wgpu::ComputePipeline,
        bindings: &[(u32, Resource<'_>)],
        groups: (u32, u32),
    ) {
        let pipeline = pipeline(&self.engine.kernels).clone();
        self.dispatch(&pipeline, bindings, groups, Reuse::EveryStep);
    }

    pub(crate) fn copy(
        &mut self,
        from: &wgpu::Buffer,
        from_offset: u64,
        to: &wgpu::Buffer,
        to_offset: u64,
        bytes: u64,
    ) {
        // A copy is not part of a compute pass: it ends the open one.
        self.pass = None;
        self.encoder
            .copy_buffer_to_buffer(from, from_offset, to, to_offset, bytes);
    }

    /// `y = x Wᵀ` per `params` (bias and accumulation by its flags): the matrix-vector kernel
    /// for one row, the tiled one for more.
    pub(crate) fn linear(
        &mut self,
        params: &LinearParams,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        bias: Option<&wgpu::Buffer>,
        weight: WeightBinding<'_>,
    ) {
        let kernels = Arc::clone(&self.engine.kernels);
        let (pipelines, weight_bindings) = weight.resolve(&kernels);
        let (pipeline, groups) = if params.rows == 1 {
            let groups = (params.n as usize).div_ceil(MATVEC_ROWS);
            (&pipelines.matvec, grid(&self.engine, groups))
        } else {
            (
                &pipelines.matmul,
                (params.n.div_ceil(16), params.rows.div_ceil(16)),
            )
        };
        let mut bindings = vec![
            (0, uniform_of(params)),
            (1, Resource::Buffer(x)),
            (2, Resource::Buffer(y)),
            (3, Resource::Buffer(bias.unwrap_or(&kernels.no_bias))),
        ];
        bindings.extend(weight_bindings);
        self.dispatch(pipeline, &bindings, groups, Reuse::EveryStep);
    }

    /// `y[n * k + j] = W[n, j]` for the weight of `params` (`n`, `k`).
    pub(crate) fn unpack(
        &mut self,
        params: &LinearParams,
        y: &wgpu::Buffer,
        weight: WeightBinding<'_>,
    ) {
        let kernels = Arc::clone(&self.engine.kernels);
        let (pipelines, weight_bindings) = weight.resolve(&kernels);
        let groups = grid(
            &self.engine,
            (params.n as usize * params.k as usize).div_ceil(64),
        );
        let mut bindings = vec![(0, uniform_of(params)), (2, Resource::Buffer(y))];
        bindings.extend(weight_bindings);
        self.dispatch(&pipelines.unpack, &bindings, groups, Reuse::EveryStep);
    }

    /// The embedding rows of the step buffer's `t` new tokens that lie in this part of the
    /// embedding (`params`: its first row in `row`, its rows in `n`, the width in `k`), widened
    /// to f32, into rows `0 .. t` of `y`.
    pub(crate) fn gather_rows(
        &mut self,
        params: &LinearParams,
        t: usize,
        step: &StepBuffer,
        y: &wgpu::Buffer,
        weight: WeightBinding<'_>,
    ) {
        let kernels = Arc::clone(&self.engine.kernels);
        let (pipelines, weight_bindings) = weight.resolve(&kernels);
        let groups = ((params.k as usize).div_ceil(64) as u32, t as u32);
        let mut bindings = vec![
            (0, uniform_of(params)),
            (2, Resource::Buffer(y)),
            (7, Resource::Buffer(&step.buffer)),
        ];
        bindings.extend(weight_bindings);
        self.dispatch(&pipelines.gather_rows, &bindings, groups, Reuse::EveryStep);
    }

    /// LayerNorm (with `bias`) or RMSNorm (without) of `rows` rows: `x` -> `y`.
    pub(crate) fn norm(
        &mut self,
        rows: usize,
        params: &NormParams,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        weight: &wgpu::Buffer,
        bias: Option<&wgpu::Buffer>,
    ) {
        let groups = (rows as u32, 1);
        let mut bindings = vec![
            (0, uniform_of(params)),
            (1, Resource::Buffer(x)),
            (2, Resource::Buffer(y)),
            (3, Resource::Buffer(weight)),
        ];
        match bias {
            Some(b) => {
                bindings.push((4, Resource::Buffer(b)));
                self.run(|k| &k.layer_norm, &bindings, groups);
            }
            None => self.run(|k| &k.rms_norm, &bindings, groups),
        }
    }

    /// BLOOM's tanh GELU on the first `n` values of `a`, in place.
    pub(crate) fn gelu_tanh(&mut self, n: usize, a: &wgpu::Buffer) {
        let groups = grid(&self.engine, n.div_ceil(64));
        let bindings = [
            (0, uniform_of(&ActParams { n: n as u32 })),
            (1, Resource::Buffer(a)),
        ];
        self.run(|k| &k.gelu_tanh, &bindings, groups);
    }

    /// `gate = silu(gate) * up` on the first `n` values.
    pub(crate) fn silu_mul(&mut self, n: usize, gate: &wgpu::Buffer, up: &wgpu::Buffer) {
        let groups = grid(&self.engine, n.div_ceil(64));
        let bindings = [
            (0, uniform_of(&ActParams { n: n as u32 })),
            (1, Resource::Buffer(gate)),
            (2, Resource::Buffer(up)),
        ];
        self.run(|k| &k.silu_mul, &bindings, groups);
    }

    /// RoPE in place on the heads of `x` (`params`: t, heads, head_dim, strides, offset,
    /// layout; the position from the step buffer).
    pub(crate) fn rope(
        &mut self,
        params: &AttnParams,
        step: &StepBuffer,
        x: &wgpu::Buffer,
        cos: &wgpu::Buffer,
        sin: &wgpu::Buffer,
    ) {
        let threads = (params.t * params.heads * params.head_dim / 2) as usize;
        let bindings = [
            (0, uniform_of(params)),
            (1, Resource::Buffer(x)),
            (2, Resource::Buffer(cos)),
            (3, Resource::Buffer(sin)),
            (14, Resource::Buffer(&step.buffer)),
        ];
        self.run(|k| &k.rope, &bindings, (threads.div_ceil(64) as u32, 1));
    }

    /// Appends the `t` new keys and values (`params`: strides, k offset, v offset) to the cache.
    pub(crate) fn kv_append(
        &mut self,
        params: &AttnParams,
        step: &StepBuffer,
        k_src: &wgpu::Buffer,
        v_src: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
    ) {
        let threads = (params.t * params.kv_heads * params.head_dim) as usize;
        let bindings = [
            (0, uniform_of(params)),
            (4, Resource::Buffer(k_src)),
            (5, Resource::Buffer(v_src)),
            (6, Resource::Buffer(k_cache)),
            (7, Resource::Buffer(v_cache)),
            (14, Resource::Buffer(&step.buffer)),
        ];
        self.run(
            |k| &k.kv_append,
            &bindings,
            (threads.div_ceil(64) as u32, 1),
        );
    }

    /// Causal attention of the `t` new queries of `q` over the cache, into `context`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &mut self,
        params: &AttnParams,
        step: &StepBuffer,
        q: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        slopes: &wgpu::Buffer,
        scores: &wgpu::Buffer,
        context: &wgpu::Buffer,
    ) {
        let bindings = [
            (0, uniform_of(params)),
            (8, Resource::Buffer(q)),
            (9, Resource::Buffer(k_cache)),
            (10, Resource::Buffer(v_cache)),
            (11, Resource::Buffer(slopes)),
            (12, Resource::Buffer(scores)),
            (13, Resource::Buffer(context)),
            (14, Resource::Buffer(&step.buffer)),
        ];
        self.run(|k| &k.attention, &bindings, (params.heads, params.t));
    }

    /// The repetition penalty on `logits` for the distinct ids in `context_ids`.
    pub(crate) fn repetition_penalty(
        &mut self,
        params: &SampleParams,
        logits: &wgpu::Buffer,
        context_ids: &wgpu::Buffer,
    ) {
        let pipeline = self.engine.kernels.repetition_penalty.clone();
        let bindings = [
            (0, uniform_of(params)),
            (1, Resource::Buffer(logits)),
            (2, Resource::Buffer(context_ids)),
        ];
        let groups = ((params.context_len as usize).div_ceil(64).max(1) as u32, 1);
        self.dispatch(&pipeline, &bindings, groups, Reuse::ThisStepOnly);
    }

    /// The chosen token into `token[0]`: argmax, or a draw per `params` (which overwrites
    /// `logits` with probabilities).
    pub(crate) fn choose(
        &mut self,
        params: &SampleParams,
        greedy: bool,
        logits: &wgpu::Buffer,
        token: &wgpu::Buffer,
    ) {
        let kernels = &self.engine.kernels;
        let pipeline = if greedy {
            kernels.argmax.clone()
        } else {
            kernels.sample.clone()
        };
        let bindings = [
            (0, uniform_of(params)),
            (1, Resource::Buffer(logits)),
            (3, Resource::Buffer(token)),
        ];
        self.dispatch(&pipeline, &bindings, (1, 1), Reuse::ThisStepOnly);
    }
}
