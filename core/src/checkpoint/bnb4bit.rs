//! 4-bit checkpoints in the layout transformers writes for bitsandbytes `Linear4bit` weights.
//!
//! A quantized weight `<w>` is stored as
//! - `<w>`: U8 [ceil(numel/2), 1], the packed codes;
//! - `<w>.absmax`: F32 [blocks], or U8 [blocks] when the absmax is double-quantized;
//! - `<w>.quant_map`: F32 [16], the 4-bit codebook;
//! - `<w>.nested_absmax`: F32 [ceil(blocks/256)] and `<w>.nested_quant_map`: F32 [256]
//!   (double quant only);
//! - `<w>.quant_state.bitsandbytes__nf4|fp4`: U8, the bytes of a JSON object (`quant_type`,
//!   `blocksize`, `dtype`, `shape`, and with double quant `nested_blocksize`, `nested_dtype`,
//!   `nested_offset`) exactly as Python's `json.dumps` writes it.
//!
//! and `config.json` carries a `quantization_config` block.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{RawTensor, TensorInfo, TensorSource};
use crate::quant::{self, Absmax, DoubleQuant, QuantType, Quantized4};
use crate::{pyjson, DType, Error, Result};

const STATE_SUFFIX: &str = ".quant_state.bitsandbytes__";
/// The block size bitsandbytes uses for the nested (double) quantization of absmax.
const NESTED_BLOCKSIZE: usize = 256;

/// The `quant_state` JSON of `q`, byte for byte as bitsandbytes' `QuantState.as_dict(packed=True)`
/// serializes it through `json.dumps`.
pub fn quant_state_json(q: &Quantized4) -> String {
    let shape: Vec<String> = q.shape.iter().map(usize::to_string).collect();
    let mut s = format!(
        "{{\"quant_type\": {}, \"blocksize\": {}, \"dtype\": {}, \"shape\": [{}]",
        pyjson::string(q.quant_type.as_str()),
        q.blocksize,
        pyjson::string(q.dtype.torch_name()),
        shape.join(", ")
    );
    if let Absmax::Double(d) = &q.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            d.nested_blocksize,
            pyjson::float_repr(f64::from(d.offset))
        ));
    }
    s.push('}');
    s
}

fn f32_tensor(values: &[f32]) -> RawTensor {
    RawTensor {
        dtype: DType::F32,
        shape: vec![values.len()],
        data: crate::dtype::from_f32(DType::F32, values),
    }
}

fn u8_tensor(bytes: Vec<u8>, shape: Vec<usize>) -> RawTensor {
    RawTensor {
        dtype: DType::U8,
        shape,
        data: bytes,
    }
}

/// The tensors that stand for the quantized weight `name` in a checkpoint, as transformers
/// names and shapes them.
pub fn serialize(name: &str, q: &Quantized4) -> Vec<(String, RawTensor)> {
    let mut out = vec![(
        name.to_string(),
        u8_tensor(q.packed.clone(), vec![q.packed.len(), 1]),
    )];
    match &q.absmax {
        Absmax::Plain(a) => out.push((format!("{name}.absmax"), f32_tensor(a))),
        Absmax::Double(d) => {
            out.push((
                format!("{name}.absmax"),
                u8_tensor(d.quantized.clone(), vec![d.quantized.len()]),
            ));
            out.push((
                format!("{name}.nested_absmax"),
                f32_tensor(&d.nested_absmax),
            ));
            out.push((
                format!("{name}.nested_quant_map"),
                f32_tensor(&quant::dynamic_map_signed()),
            ));
        }
    }
    out.push((
        format!("{name}.quant_map"),
        f32_tensor(quant::codebook(q.quant_type)),
    ));
    let state = quant_state_json(q).into_bytes();
    let len = state.len();
    out.push((
        format!("{name}{STATE_SUFFIX}{}", q.quant_type.as_str()),
        u8_tensor(state, vec![len]),
    ));
    out
}

/// The parsed `quant_state` JSON of one weight.
struct QuantState {
    quant_type: QuantType,
    blocksize: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// `(nested_blocksize, nested_offset)` with double quant.
    nested: Option<(usize, f32)>,
}

fn parse_quant_state(file: &str, tensor: &str, bytes: &[u8]) -> Result<QuantState> {
    let bad = |msg: String| Error::tensor(file, tensor, msg);
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("quant_state is not valid JSON: {e}")))?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    let quant_type: QuantType = field("quant_type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("quant_state has no `quant_type`".into()))?
        .parse()
        .map_err(|e: Error| bad(e.to_string()))?;
    let blocksize = field("blocksize")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("quant_state has no integer `blocksize`".into()))?
        as usize;
    let dtype_name = field("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("quant_state has no `dtype`".into()))?;
    let dtype = DType::parse_float(dtype_name).ok_or_else(|| {
        bad(format!(
            "quant_state dtype {dtype_name:?} is not a float type"
        ))
    })?;
    let shape = field("shape")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| bad("quant_state `shape` must be a list of integers".into()))?;
    // Every reader multiplies the dimensions out; a lying state must not overflow them.
    if shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_none()
    {
        return Err(bad(format!(
            "quant_state shape {shape:?} has more elements than memory can address"
        )));
    }
    let nested = match field("nested_offset") {
        None => None,
        Some(off) => {
            let offset = off
                .as_f64()
                .ok_or_else(|| bad("`nested_offset` must be a number".into()))?;
            let nb = field("nested_blocksize")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("double quant state has no `nested_blocksize`".into()))?;
            Some((nb as usize, offset as f32))
        }
    };
    Ok(QuantState {
        quant_type,
        blocksize,
        dtype,
        shape,
        nested,
    })
}

/// Checks that `t` has `dtype` and `numel` elements; the message names the tensor.
fn expect(file: &str, name: &str, t: &RawTensor, dtype: DType, numel: usize) -> Result<()> {
    let got: usize = t.shape.iter().product();
    if t.dtype != dtype || got != numel {
        return Err(Error::tensor(
            file,
            name,
            format!(
                "expected {dtype} with {numel} elements, found {} with shape {:?}",
                t.dtype, t.shape
            ),
        ));
    }
    Ok(())
}

/// Reads the quantized weight `name` (the packed tensor's name) from `source`, checking every
/// piece against the quant state.
pub fn deserialize(
    source: &dyn TensorSource,
    name: &str,
    quant_type: QuantType,
) -> Result<Quantized4> {
    let state_name = format!("{name}{STATE_SUFFIX}{}", quant_type.as_str());
    let file = source.file_of(&state_name).unwrap_or_default();
    let state_raw = source.read(&state_name)?;
    let state = parse_quant_state(&file, &state_name, &state_raw.data)?;
    if state.quant_type != quant_type {
        return Err(Error::tensor(
            &file,
            &state_name,
            format!(
                "names {} but its JSON says {}",
                quant_type.as_str(),
                state.quant_type.as_str()
            ),
        ));
    }
    let numel: usize = state.shape.iter().product();
    let blocks = numel.div_ceil(state.blocksize.max(1));
    let packed = source.read(name)?;
    expect(&file, name, &packed, DType::U8, numel.div_ceil(2))?;
    let quant_map_name = format!("{name}.quant_map");
    let quant_map = source.read(&quant_map_name)?;
    expect(&file, &quant_map_name, &quant_map, DType::F32, 16)?;
    // The dequant kernels use their built-in table, not the stored map: a different map would
    // silently change the weights, so it is an error.
    if quant_map.to_f32().as_deref() != Some(&quant::codebook(quant_type)[..]) {
        return Err(Error::tensor(
            &file,
            &quant_map_name,
            format!("is not bitsandbytes' {} codebook", quant_type.as_str()),
        ));
    }
    let absmax_name = format!("{name}.absmax");
    let absmax_raw = source.read(&absmax_name)?;
    let absmax = match state.nested {
        None => {
            expect(&file, &absmax_name, &absmax_raw, DType::F32, blocks)?;
            Absmax::Plain(absmax_raw.to_f32().expect("checked F32"))
        }
        Some((nested_blocksize, offset)) => {
            expect(&file, &absmax_name, &absmax_raw, DType::U8, blocks)?;
            if nested_blocksize != NESTED_BLOCKSIZE {
                return Err(Error::tensor(
                    &file,
                    &state_name,
                    format!("nested_blocksize {nested_blocksize} is not supported (only 256)"),
                ));
            }
            let nested_name = format!("{name}.nested_absmax");
            let nested = source.read(&nested_name)?;
            expect(
                &file,
                &nested_name,
                &nested,
                DType::F32,
                blocks.div_ceil(nested_blocksize),
            )?;
            let map_name = format!("{name}.nested_quant_map");
            let map = source.read(&map_name)?;
            expect(&file, &map_name, &map, DType::F32, 256)?;
            if map.to_f32().as_deref() != Some(&quant::dynamic_map_signed()[..]) {
                return Err(Error::tensor(
                    &file,
                    &map_name,
                    "is not bitsandbytes' signed dynamic 8-bit map",
                ));
            }
            Absmax::Double(DoubleQuant {
                quantized: absmax_raw.data,
                nested_absmax: nested.to_f32().expect("checked F32"),
                offset,
                nested_blocksize,
            })
        }
    };
    Ok(Quantized4 {
        quant_type: state.quant_type,
        blocksize: state.blocksize,
        shape: state.shape,
        dtype: state.dtype,
        packed: packed.data,
        absmax,
    })
}

/// A 4-bit checkpoint seen as a full-precision one: quantized weights are dequantized on read
/// (to the dtype they were quantized from), their auxiliary tensors are hidden, and every other
/// tensor passes through. Models load from it exactly as from a full-precision checkpoint.
pub struct Dequantizing<S> {
    inner: S,
    /// Packed weight name → its quant type.
    quantized: BTreeMap<String, QuantType>,
    /// Names of the auxiliary tensors (`.absmax`, `.quant_map`, ...) to hide.
    hidden: BTreeSet<String>,
}

impl<S: TensorSource> Dequantizing<S> {
    pub fn new(inner: S) -> Self {
        let mut quantized = BTreeMap::new();
        for info in inner.tensor_infos() {
            if let Some((weight, qt)) = info.name.split_once(STATE_SUFFIX) {
                if let Ok(qt) = qt.parse::<QuantType>() {
                    quantized.insert(weight.to_string(), qt);
                }
            }
        }
        let hidden = inner
            .tensor_infos()
            .into_iter()
            .map(|i| i.name)
            .filter(|n| {
                quantized.keys().any(|w| {
                    n.strip_prefix(w.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
                })
            })
            .collect();
        Dequantizing {
            inner,
            quantized,
            hidden,
        }
    }

    /// Whether the checkpoint holds any 4-bit weight.
    pub fn is_quantized(&self) -> bool {
        !self.quantized.is_empty()
    }

    /// The 4-bit form of `name`, for engines that keep weights quantized; `None` if `name` is
    /// not a quantized weight.
    pub fn quantized(&self, name: &str) -> Option<Result<Quantized4>> {
        self.quantized
            .get(name)
            .map(|&qt| deserialize(&self.inner, name, qt))
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: TensorSource> TensorSource for Dequantizing<S> {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        let mut infos: Vec<TensorInfo> = self
            .inner
            .tensor_infos()
            .into_iter()
            .filter(|i| !self.hidden.contains(&i.name))
            .map(|i| match self.quantized.get(&i.name) {
                // The shape and dtype of a quantized weight live in its quant state; reading
                // that small JSON here keeps `tensor_infos` honest without dequantizing.
                Some(&qt) => match deserialize_state(&self.inner, &i.name, qt) {
                    Some((dtype, shape)) => TensorInfo {
                        name: i.name,
                        dtype,
                        shape,
                    },
                    None => i,
                },
                None => i,
            })
            .collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    fn read(&self, name: &str) -> Result<RawTensor> {
        match self.quantized.get(name) {
            None => self.inner.read(name),
            Some(&qt) => {
                let q = deserialize(&self.inner, name, qt)?;
                let values = quant::dequantize_4bit(&q)?;
                Ok(RawTensor {
                    dtype: q.dtype,
                    shape: q.shape.clone(),
                    data: crate::dtype::from_f32(q.dtype, &values),
                })
            }
        }
    }

    fn file_of(&self, name: &str) -> Option<String> {
        self.inner.file_of(name)
    }

    fn quantized(&self, name: &str) -> Option<Result<Quantized4>> {
        Dequantizing::quantized(self, name)
    }
}

/// dtype and shape from a weight's quant state, or `None` if it cannot be read (the error then
/// surfaces, with its message, when the tensor itself is read).
fn deserialize_state(
    source: &dyn TensorSource,
    name: &str,
    qt: QuantType,
) -> Option<(DType, Vec<usize>)> {
    let state_name = format!("{name}{STATE_SUFFIX}{}", qt.as_str());
    let raw = source.read(&state_name).ok()?;
    let s = parse_quant_state("", &state_name, &raw.data).ok()?;
    Some((s.dtype, s.shape))
}

/// A full-precision checkpoint whose linear weights read as bitsandbytes would hold them in a
/// 4-bit model: `dequantize(quantize(w))`, rounded to `w`'s dtype. This is the frozen base of
/// QLoRA training on a full-precision checkpoint (`--quan` on load): the model sees exactly the
/// weights it would see after `qlora quantize`, without writing them out.
pub struct QuantizeOnRead<S> {
    inner: S,
    /// Names of the weights to quantize (the linear projections).
    linear: BTreeSet<String>,
    quant_type: QuantType,
    blocksize: usize,
    double_quant: bool,
}

impl<S: TensorSource> QuantizeOnRead<S> {
    pub fn new(
        inner: S,
        linear_weights: impl IntoIterator<Item = String>,
        quant_type: QuantType,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        if !quant::BLOCKSIZES.contains(&blocksize) {
            return Err(Error::Invalid(format!(
                "blocksize {blocksize} is not one of {:?}",
                quant::BLOCKSIZES
            )));
        }
        Ok(QuantizeOnRead {
            inner,
            linear: linear_weights.into_iter().collect(),
            quant_type,
            blocksize,
            double_quant,
        })
    }
}

impl<S: TensorSource> TensorSource for QuantizeOnRead<S> {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.inner.tensor_infos()
    }

    fn read(&self, name: &str) -> Result<RawTensor> {
        let raw = self.inner.read(name)?;
        if !self.linear.contains(name) {
            return Ok(raw);
        }
        let q = self.quantize(name, &raw)?;
        let values = quant::dequantize_4bit(&q)?;
        Ok(RawTensor {
            dtype: raw.dtype,
            shape: raw.shape,
            data: crate::dtype::from_f32(raw.dtype, &values),
        })
    }

    fn file_of(&self, name: &str) -> Option<String> {
        self.inner.file_of(name)
    }

    fn quantized(&self, name: &str) -> Option<Result<Quantized4>> {
        if !self.linear.contains(name) {
            return None;
        }
        Some(
            self.inner
                .read(name)
                .and_then(|raw| self.quantize(name, &raw)),
        )
    }
}

impl<S: TensorSource> QuantizeOnRead<S> {
    /// `raw` (the full-precision weight `name`) quantized as this source's settings say.
    fn quantize(&self, name: &str, raw: &RawTensor) -> Result<Quantized4> {
        let data = quant::FloatData::from_le_bytes(raw.dtype, &raw.data).map_err(|e| {
            Error::tensor(
                self.inner.file_of(name).unwrap_or_default(),
                name,
                e.to_string(),
            )
        })?;
        quant::quantize_4bit(
            data.as_slice(),
            &raw.shape,
            self.quant_type,
            self.blocksize,
            self.double_quant,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The element count of a lying shape overflowed `usize` in `deserialize` and
    /// `Dequantizing::tensor_infos` (fuzz/corpus/bnb_quant_state/regression_shape_overflow).
    #[test]
    fn quant_state_with_overflowing_shape_is_an_error() {
        let json = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4294967296, 4294967296]}"#;
        let Err(e) = parse_quant_state("m.safetensors", "w.quant_state", json) else {
            panic!("an overflowing shape was accepted");
        };
        assert!(
            e.to_string()
                .contains("more elements than memory can address"),
            "{e}"
        );
    }
}
