//! The WGSL kernels (`shaders/wgsl/`), compiled once per device, and one recording function
//! per kernel. Each function checks nothing the caller cannot get wrong silently: shapes come
//! from the model, which the loader checked.

use bytemuck::{Pod, Zeroable};
use qlora_core::quant::{codebook, dynamic_map_signed, QuantType};

use crate::buffers::{uniform, Dense};
use crate::device::Engine;

const LINEAR: &str = include_str!("../wgsl/linear.wgsl");
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

/// The entry points of linear.wgsl for one weight format.
#[derive(Clone)]
pub(crate) struct LinearPipelines {
    pub matvec: wgpu::ComputePipeline,
    pub matmul: wgpu::ComputePipeline,
    pub unpack: wgpu::ComputePipeline,
    pub gather_row: wgpu::ComputePipeline,
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
        let linear = |m: &wgpu::ShaderModule, constants: &[(&str, f64)]| LinearPipelines {
            matvec: specialized(m, "matvec", constants),
            matmul: specialized(m, "matmul", constants),
            unpack: specialized(m, "unpack", constants),
            gather_row: specialized(m, "gather_row", constants),
        };
        let q4 = module("linear q4", format!("{LINEAR}\n{WEIGHTS_Q4}"));
        let dense = module("linear dense", format!("{LINEAR}\n{WEIGHTS_DENSE}"));
        let norm = module("norm", NORM.into());
        let activations = module("activations", ACTIVATIONS.into());
        let attention = module("attention", ATTENTION.into());
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
            q4: linear(&q4, &[]),
            dense: [Dense::F32, Dense::F16, Dense::Bf16]
                .map(|d| linear(&dense, &[("DTYPE", f64::from(d.shader_code()))])),
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
    /// `gather_row` only: the row to copy.
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
    pub past: u32,
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

/// The weight of a linear dispatch: a full-precision matrix, or a 4-bit one with its parameters.
pub(crate) enum WeightBinding<'a> {
    Dense(&'a wgpu::Buffer, Dense),
    Q4(&'a wgpu::Buffer, &'a Q4Params),
}

impl WeightBinding<'_> {
    /// The pipelines of this weight's format, and its bindings from 4 on.
    fn resolve<'e>(&self, engine: &'e Engine) -> (&'e LinearPipelines, Vec<(u32, wgpu::Buffer)>) {
        let kernels = &engine.kernels;
        match self {
            WeightBinding::Dense(w, dtype) => {
                (&kernels.dense[*dtype as usize], vec![(4, (*w).clone())])
            }
            WeightBinding::Q4(w, q) => (
                &kernels.q4,
                vec![
                    (4, uniform(engine, *q)),
                    (5, (*w).clone()),
                    (6, kernels.tables.clone()),
                ],
            ),
        }
    }
}

/// Records dispatches into one command encoder.
pub(crate) struct Recorder {
    pub engine: Engine,
    pub encoder: wgpu::CommandEncoder,
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

fn dispatch(
    engine: &Engine,
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    bindings: &[(u32, &wgpu::Buffer)],
    groups: (u32, u32),
) {
    let entries: Vec<wgpu::BindGroupEntry> = bindings
        .iter()
        .map(|&(binding, buffer)| wgpu::BindGroupEntry {
            binding,
            resource: buffer.as_entire_binding(),
        })
        .collect();
    let bind_group = engine.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, &bind_group, &[]);
    pass.dispatch_workgroups(groups.0, groups.1, 1);
}

impl Recorder {
    pub(crate) fn new(engine: &Engine) -> Recorder {
        let encoder = engine
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        Recorder {
            engine: engine.clone(),
            encoder,
        }
    }

    pub(crate) fn copy(
        &mut self,
        from: &wgpu::Buffer,
        from_offset: u64,
        to: &wgpu::Buffer,
        to_offset: u64,
        bytes: u64,
    ) {
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
        let p = uniform(&self.engine, params);
        let (pipelines, weight_bindings) = weight.resolve(&self.engine);
        let (pipeline, groups) = if params.rows == 1 {
            (&pipelines.matvec, grid(&self.engine, params.n as usize))
        } else {
            (
                &pipelines.matmul,
                (params.n.div_ceil(16), params.rows.div_ceil(16)),
            )
        };
        let no_bias = &self.engine.kernels.no_bias;
        let mut bindings = vec![(0, &p), (1, x), (2, y), (3, bias.unwrap_or(no_bias))];
        bindings.extend(weight_bindings.iter().map(|(i, b)| (*i, b)));
        dispatch(&self.engine, &mut self.encoder, pipeline, &bindings, groups);
    }

    /// `y[n * k + j] = W[n, j]` for the weight of `params` (`n`, `k`).
    pub(crate) fn unpack(
        &mut self,
        params: &LinearParams,
        y: &wgpu::Buffer,
        weight: WeightBinding<'_>,
    ) {
        let groups = grid(
            &self.engine,
            (params.n as usize * params.k as usize).div_ceil(64),
        );
        self.weight_to(params, y, weight, |p| &p.unpack, groups);
    }

    /// `y[y_offset ..][..k] = W[row, ..]`, widened to f32 (an embedding lookup).
    pub(crate) fn gather_row(
        &mut self,
        params: &LinearParams,
        y: &wgpu::Buffer,
        weight: WeightBinding<'_>,
    ) {
        let groups = ((params.k as usize).div_ceil(64) as u32, 1);
        self.weight_to(params, y, weight, |p| &p.gather_row, groups);
    }

    /// A dispatch of a weight-reading entry point that writes only `y`.
    fn weight_to(
        &mut self,
        params: &LinearParams,
        y: &wgpu::Buffer,
        weight: WeightBinding<'_>,
        entry: impl Fn(&LinearPipelines) -> &wgpu::ComputePipeline,
        groups: (u32, u32),
    ) {
        let p = uniform(&self.engine, params);
        let (pipelines, weight_bindings) = weight.resolve(&self.engine);
        let mut bindings = vec![(0, &p), (2, y)];
        bindings.extend(weight_bindings.iter().map(|(i, b)| (*i, b)));
        dispatch(
            &self.engine,
            &mut self.encoder,
            entry(pipelines),
            &bindings,
            groups,
        );
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
        let p = uniform(&self.engine, params);
        let groups = (rows as u32, 1);
        match bias {
            Some(b) => dispatch(
                &self.engine,
                &mut self.encoder,
                &self.engine.kernels.layer_norm,
                &[(0, &p), (1, x), (2, y), (3, weight), (4, b)],
                groups,
            ),
            None => dispatch(
                &self.engine,
                &mut self.encoder,
                &self.engine.kernels.rms_norm,
                &[(0, &p), (1, x), (2, y), (3, weight)],
                groups,
            ),
        }
    }

    /// BLOOM's tanh GELU on the first `n` values of `a`, in place.
    pub(crate) fn gelu_tanh(&mut self, n: usize, a: &wgpu::Buffer) {
        let p = uniform(&self.engine, &ActParams { n: n as u32 });
        let groups = grid(&self.engine, n.div_ceil(64));
        dispatch(
            &self.engine,
            &mut self.encoder,
            &self.engine.kernels.gelu_tanh,
            &[(0, &p), (1, a)],
            groups,
        );
    }

    /// `gate = silu(gate) * up` on the first `n` values.
    pub(crate) fn silu_mul(&mut self, n: usize, gate: &wgpu::Buffer, up: &wgpu::Buffer) {
        let p = uniform(&self.engine, &ActParams { n: n as u32 });
        let groups = grid(&self.engine, n.div_ceil(64));
        dispatch(
            &self.engine,
            &mut self.encoder,
            &self.engine.kernels.silu_mul,
            &[(0, &p), (1, gate), (2, up)],
            groups,
        );
    }

    /// RoPE in place on the heads of `x` (`params`: t, past, heads, head_dim, strides, offset,
    /// layout).
    pub(crate) fn rope(
        &mut self,
        params: &AttnParams,
        x: &wgpu::Buffer,
        cos: &wgpu::Buffer,
        sin: &wgpu::Buffer,
    ) {
        let p = uniform(&self.engine, params);
        let threads = (params.t * params.heads * params.head_dim / 2) as usize;
        dispatch(
            &self.engine,
            &mut self.encoder,
            &self.engine.kernels.rope,
            &[(0, &p), (1, x), (2, cos), (3, sin)],
            (threads.div_ceil(64) as u32, 1),
        );
    }

    /// Appends the `t` new keys and values (`params`: strides, k offset, v offset) to the cache.
    pub(crate) fn kv_append(
        &mut self,
        params: &AttnParams,
        k_src: &wgpu::Buffer,
        v_src: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
    ) {
        let p = uniform(&self.engine, params);
        let threads = (params.t * params.kv_heads * params.head_dim) as usize;
        dispatch(
            &self.engine,
            &mut self.encoder,
            &self.engine.kernels.kv_append,
            &[(0, &p), (4, k_src), (5, v_src), (6, k_cache), (7, v_cache)],
            (threads.div_ceil(64) as u32, 1),
        );
    }

    /// Causal attention of the `t` new queries of `q` over the cache, into `context`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &mut self,
        params: &AttnParams,
        q: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        slopes: &wgpu::Buffer,
        scores: &wgpu::Buffer,
        context: &wgpu::Buffer,
    ) {
        let p = uniform(&self.engine, params);
        dispatch(
            &self.engine,
            &mut self.encoder,
            &self.engine.kernels.attention,
            &[
                (0, &p),
                (8, q),
                (9, k_cache),
                (10, v_cache),
                (11, slopes),
                (12, scores),
                (13, context),
            ],
            (params.heads, params.t),
        );
    }

    /// The repetition penalty on `logits` for the distinct ids in `context_ids`.
    pub(crate) fn repetition_penalty(
        &mut self,
        params: &SampleParams,
        logits: &wgpu::Buffer,
        context_ids: &wgpu::Buffer,
    ) {
        let p = uniform(&self.engine, params);
        dispatch(
            &self.engine,
            &mut self.encoder,
            &self.engine.kernels.repetition_penalty,
            &[(0, &p), (1, logits), (2, context_ids)],
            ((params.context_len as usize).div_ceil(64).max(1) as u32, 1),
        );
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
        let p = uniform(&self.engine, params);
        let kernels = &self.engine.kernels;
        let pipeline = if greedy {
            &kernels.argmax
        } else {
            &kernels.sample
        };
        dispatch(
            &self.engine,
            &mut self.encoder,
            pipeline,
            &[(0, &p), (1, logits), (3, token)],
            (1, 1),
        );
    }
}
