//! Checkpoint tensors on the device: 4-bit linear weights as bitsandbytes packs them (never
//! dequantized into a dense copy), everything else in f32, LoRA pairs beside their projection.

use qlora_core::arch::{ArchDescription, LinearSpec, NormSpec};
use qlora_core::checkpoint::bnb4bit::Dequantizing;
use qlora_core::checkpoint::{RawTensor, StoredNames, TensorInfo, TensorSource};
use qlora_core::peft::LoraPair;
use qlora_core::quant::{self, Absmax, Quantized4};
use qlora_core::{DType, Error, Result};

use crate::buffers::{upload, upload_f32, Dense, Matrix, RowSplit};
use crate::device::Engine;
use crate::kernels::{
    code_table, LinearParams, NormParams, Q4Params, Recorder, WeightBinding, ACCUMULATE, HAS_BIAS,
};
use crate::model::QuantizeOnLoad;

/// A borrowed checkpoint, so that [`Dequantizing`] can wrap it.
struct Borrowed<'a>(&'a dyn TensorSource);

impl TensorSource for Borrowed<'_> {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.0.tensor_infos()
    }
    fn read(&self, name: &str) -> Result<RawTensor> {
        self.0.read(name)
    }
    fn file_of(&self, name: &str) -> Option<String> {
        self.0.file_of(name)
    }
}

/// The tensors of one model from a checkpoint: full precision, or HF 4-bit (whose quantized
/// weights are taken as they are stored).
pub(crate) struct Checkpoint<'a> {
    source: Dequantizing<Borrowed<'a>>,
    names: StoredNames,
}

/// A linear weight as read: 4-bit, or full precision `[out, in]`.
pub(crate) enum LinearData {
    Q4(Quantized4),
    Dense(Matrix),
}

impl<'a> Checkpoint<'a> {
    pub(crate) fn new(source: &'a dyn TensorSource, description: &ArchDescription) -> Self {
        let source = Dequantizing::new(Borrowed(source));
        let names = StoredNames::of(&source, description);
        Checkpoint { source, names }
    }

    fn stored_name<'n>(&self, name: &'n str) -> &'n str {
        self.names.stored(name)
    }

    fn file(&self, name: &str) -> String {
        self.source
            .file_of(name)
            .unwrap_or_else(|| "checkpoint".into())
    }

    /// `name`, which must be a float tensor of `shape`.
    fn read(&self, name: &str, shape: &[usize]) -> Result<RawTensor> {
        let stored = self.stored_name(name);
        let raw = self.source.read(stored)?;
        let problem = if raw.shape != shape {
            Some(format!("shape {:?}, expected {shape:?}", raw.shape))
        } else if !raw.dtype.is_float() {
            Some(format!("dtype {} is not a float type", raw.dtype))
        } else if raw.data.len() != shape.iter().product::<usize>() * raw.dtype.size_in_bytes() {
            Some(format!(
                "{} bytes do not hold shape {shape:?}",
                raw.data.len()
            ))
        } else {
            None
        };
        match problem {
            Some(msg) => Err(Error::tensor(self.file(stored), stored, msg)),
            None => Ok(raw),
        }
    }

    /// `name` as f32 values; it must have `shape`.
    pub(crate) fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let raw = self.read(name, shape)?;
        raw.to_f32().ok_or_else(|| {
            let stored = self.stored_name(name);
            Error::tensor(
                self.file(stored),
                stored,
                format!("cannot read {} as f32", raw.dtype),
            )
        })
    }

    /// `name` as a matrix for the device: its own bytes when half precision, else f32.
    pub(crate) fn matrix(&self, name: &str, shape: &[usize]) -> Result<Matrix> {
        let raw = self.read(name, shape)?;
        Ok(match Dense::of(raw.dtype) {
            Dense::F32 => Matrix {
                dtype: Dense::F32,
                data: bytemuck::cast_slice(&self.f32(name, shape)?).to_vec(),
            },
            half => Matrix {
                dtype: half,
                data: raw.data,
            },
        })
    }

    /// The weight of `spec`: as stored when 4-bit, else quantized (from its own dtype, as
    /// `QuantizeOnRead` does) when `quantize` says so, else full precision.
    pub(crate) fn linear(
        &self,
        spec: &LinearSpec,
        quantize: Option<QuantizeOnLoad>,
    ) -> Result<LinearData> {
        let name = spec.weight_name();
        let stored = self.stored_name(&name);
        let shape = [spec.out_features, spec.in_features];
        if let Some(q) = self.source.quantized(stored) {
            let q = q?;
            if q.shape != shape {
                return Err(Error::tensor(
                    self.file(stored),
                    stored,
                    format!("4-bit shape {:?}, expected {shape:?}", q.shape),
                ));
            }
            return Ok(LinearData::Q4(q));
        }
        let Some(q) = quantize else {
            return Ok(LinearData::Dense(self.matrix(&name, &shape)?));
        };
        let raw = self.read(&name, &shape)?;
        let values = quant::FloatData::from_le_bytes(raw.dtype, &raw.data)
            .map_err(|e| Error::tensor(self.file(stored), stored, e.to_string()))?;
        Ok(LinearData::Q4(quant::quantize_4bit(
            values.as_slice(),
            &shape,
            q.quant_type,
            q.blocksize,
            q.double_quant,
        )?))
    }
}

/// A 4-bit tensor in one buffer of words (weights_q4.wgsl's layout) and its parameters.
pub(crate) fn upload_q4(
    engine: &Engine,
    name: &str,
    q: &Quantized4,
) -> Result<(wgpu::Buffer, Q4Params)> {
    let bad = |msg: String| Error::Invalid(format!("{name}: {msg}"));
    q.validate().map_err(|e| bad(e.to_string()))?;
    if q.numel() > u32::MAX as usize {
        return Err(bad(format!(
            "{} elements exceed the kernels' 32-bit indices",
            q.numel()
        )));
    }
    let round_to = match q.dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        other => return Err(bad(format!("4-bit weights of {other} are not supported"))),
    };
    let words_of = |bytes: &[u8]| -> Vec<u32> {
        bytes
            .chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                u32::from_le_bytes(w)
            })
            .collect()
    };
    let mut words = words_of(&q.packed);
    let absmax_start = words.len() as u32;
    let (double_quant, nested_start, nested_blocksize, offset) = match &q.absmax {
        Absmax::Plain(values) => {
            words.extend(values.iter().map(|v| v.to_bits()));
            (0, 0, 1, 0.0)
        }
        Absmax::Double(d) => {
            if d.nested_blocksize == 0
                || d.nested_absmax.len() != d.quantized.len().div_ceil(d.nested_blocksize)
            {
                return Err(bad(format!(
                    "{} nested absmax values for {} blocks in groups of {}",
                    d.nested_absmax.len(),
                    d.quantized.len(),
                    d.nested_blocksize
                )));
            }
            words.extend(words_of(&d.quantized));
            let nested_start = words.len() as u32;
            words.extend(d.nested_absmax.iter().map(|v| v.to_bits()));
            (1, nested_start, d.nested_blocksize as u32, d.offset)
        }
    };
    let params = Q4Params {
        blocksize: q.blocksize as u32,
        double_quant,
        nested_blocksize,
        round_to,
        code_table: code_table(q.quant_type),
        absmax_start,
        nested_start,
        offset,
    };
    Ok((upload(engine, name, bytemuck::cast_slice(&words))?, params))
}

pub(crate) enum LinearWeight {
    Q4(wgpu::Buffer, Q4Params),
    Dense(RowSplit),
}

impl LinearWeight {
    pub(crate) fn upload(
        engine: &Engine,
        name: &str,
        data: &LinearData,
        cols: usize,
    ) -> Result<Self> {
        Ok(match data {
            LinearData::Q4(q) => {
                let (buffer, params) = upload_q4(engine, name, q)?;
                LinearWeight::Q4(buffer, params)
            }
            LinearData::Dense(matrix) => {
                LinearWeight::Dense(RowSplit::upload(engine, name, matrix, cols)?)
            }
        })
    }

    pub(crate) fn bytes(&self) -> u64 {
        match self {
            LinearWeight::Q4(b, _) => b.size(),
            LinearWeight::Dense(split) => split.bytes(),
        }
    }

    /// Buffers the weight occupies (more than one once split by rows).
    pub(crate) fn parts(&self) -> usize {
        match self {
            LinearWeight::Q4(..) => 1,
            LinearWeight::Dense(split) => split.parts.len(),
        }
    }
}

/// An unmerged LoRA: `scale · (x Aᵀ) Bᵀ`.
pub(crate) struct Lora {
    /// `[r, in]`
    a: wgpu::Buffer,
    /// `[out, r]`
    b: wgpu::Buffer,
    r: usize,
    scale: f32,
}

/// A linear projection `y = x Wᵀ + b` with its optional LoRA.
pub(crate) struct Linear {
    pub n: usize,
    pub k: usize,
    pub weight: LinearWeight,
    bias: Option<wgpu::Buffer>,
    lora: Option<Lora>,
}

impl Linear {
    pub(crate) fn load(
        engine: &Engine,
        checkpoint: &Checkpoint<'_>,
        spec: &LinearSpec,
        quantize: Option<QuantizeOnLoad>,
        lora: Option<(&LoraPair, f32)>,
    ) -> Result<Linear> {
        let data = checkpoint.linear(spec, quantize)?;
        let weight = LinearWeight::upload(engine, &spec.weight_name(), &data, spec.in_features)?;
        let bias = spec
            .bias_name()
            .map(|name| upload_f32(engine, &name, &checkpoint.f32(&name, &[spec.out_features])?))
            .transpose()?;
        let lora = lora
            .map(|(pair, scale)| {
                if pair.in_features != spec.in_features || pair.out_features != spec.out_features {
                    return Err(Error::Invalid(format!(
                        "the LoRA of {} is {}x{} (out x in), the projection {}x{}",
                        spec.module,
                        pair.out_features,
                        pair.in_features,
                        spec.out_features,
                        spec.in_features
                    )));
                }
                Ok(Lora {
                    a: upload_f32(engine, &format!("{} lora_A", spec.module), &pair.a)?,
                    b: upload_f32(engine, &format!("{} lora_B", spec.module), &pair.b)?,
                    r: pair.r,
                    scale,
                })
            })
            .transpose()?;
        Ok(Linear {
            n: spec.out_features,
            k: spec.in_features,
            weight,
            bias,
            lora,
        })
    }

    /// A bias-free projection of a matrix already on the device (the LM head).
    pub(crate) fn from_rows(split: RowSplit, n: usize) -> Linear {
        Linear {
            n,
            k: split.cols,
            weight: LinearWeight::Dense(split),
            bias: None,
            lora: None,
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.weight.bytes()
            + self.bias.as_ref().map_or(0, |b| b.size())
            + self.lora.as_ref().map_or(0, |l| l.a.size() + l.b.size())
    }

    /// `y[rows, n] (+)= x[rows, k] Wᵀ + b + LoRA`; `lora_scratch` holds `[rows, r]`, and without
    /// it the LoRA term is left out.
    pub(crate) fn record(
        &self,
        rec: &mut Recorder,
        rows: usize,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        accumulate: bool,
        lora_scratch: Option<&wgpu::Buffer>,
    ) {
        let flags = if accumulate { ACCUMULATE } else { 0 }
            | if self.bias.is_some() { HAS_BIAS } else { 0 };
        let params = LinearParams {
            rows: rows as u32,
            n: self.n as u32,
            k: self.k as u32,
            x_stride: self.k as u32,
            y_stride: self.n as u32,
            flags,
            scale: 1.0,
            ..Default::default()
        };
        match &self.weight {
            LinearWeight::Q4(buffer, q) => rec.linear(
                &params,
                x,
                y,
                self.bias.as_ref(),
                WeightBinding::Q4(buffer, q),
            ),
            LinearWeight::Dense(split) => {
                for part in split.parts.iter() {
                    let params = LinearParams {
                        n: part.rows as u32,
                        y_offset: part.first_row as u32,
                        ..params
                    };
                    rec.linear(
                        &params,
                        x,
                        y,
                        self.bias.as_ref(),
                        WeightBinding::Dense(&part.buffer, split.dtype),
                    );
                }
            }
        }
        if let (Some(lora), Some(lora_scratch)) = (&self.lora, lora_scratch) {
            let r = lora.r as u32;
            let down = LinearParams {
                n: r,
                y_stride: r,
                flags: 0,
                ..params
            };
            rec.linear(
                &down,
                x,
                lora_scratch,
                None,
                WeightBinding::Dense(&lora.a, Dense::F32),
            );
            let up = LinearParams {
                k: r,
                x_stride: r,
                flags: ACCUMULATE,
                scale: lora.scale,
                ..params
            };
            rec.linear(
                &up,
                lora_scratch,
                y,
                None,
                WeightBinding::Dense(&lora.b, Dense::F32),
            );
        }
    }
}

/// A LayerNorm (with bias) or RMSNorm on the device.
pub(crate) struct Norm {
    params: NormParams,
    weight: wgpu::Buffer,
    bias: Option<wgpu::Buffer>,
}

impl Norm {
    pub(crate) fn load(
        engine: &Engine,
        checkpoint: &Checkpoint<'_>,
        spec: &NormSpec,
    ) -> Result<Norm> {
        let name = spec.weight_name();
        let weight = upload_f32(engine, &name, &checkpoint.f32(&name, &[spec.dim])?)?;
        let bias = spec
            .bias_name()
            .map(|name| upload_f32(engine, &name, &checkpoint.f32(&name, &[spec.dim])?))
            .transpose()?;
        Ok(Norm {
            params: NormParams {
                dim: spec.dim as u32,
                eps: spec.eps as f32,
            },
            weight,
            bias,
        })
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.weight.size() + self.bias.as_ref().map_or(0, |b| b.size())
    }

    pub(crate) fn record(
        &self,
        rec: &mut Recorder,
        rows: usize,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) {
        rec.norm(rows, &self.params, x, y, &self.weight, self.bias.as_ref());
    }
}

impl Engine {
    /// `dequantize_4bit(q)` on the device (the values the fused kernels multiply with):
    /// bitsandbytes' layout, plain or double-quantized absmax, rounded to `q.dtype`.
    pub async fn dequantize_4bit(&self, q: &Quantized4) -> Result<Vec<f32>> {
        let (buffer, params) = upload_q4(self, "4-bit tensor", q)?;
        let out = crate::buffers::scratch(self, "dequantized", q.numel())?;
        let mut rec = Recorder::new(self);
        let shape = LinearParams {
            rows: 1,
            n: 1,
            k: q.numel() as u32,
            ..Default::default()
        };
        rec.unpack(&shape, &out, WeightBinding::Q4(&buffer, &params));
        let bytes =
            crate::buffers::submit_and_read(self, rec.into_encoder(), &out, (q.numel() * 4) as u64)
                .await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}
