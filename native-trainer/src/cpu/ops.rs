//! The building blocks both architectures share: the checked input batch, its attention mask,
//! normalizations, softmax, dropout and the frozen-weight matmul.

use super::Mode;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, D};
use qlora_core::arch::{NormKind, NormSpec};
use qlora_core::{Error, Result};
use rand::Rng;

/// Token ids and padding of one forward pass, checked against the model.
pub(crate) struct Batch {
    /// `[B, T]` u32.
    pub ids: Tensor,
    pub batch_size: usize,
    pub seq_len: usize,
    /// `[B * T]`, row-major: 1 for a real token, 0 for padding.
    pub key_mask: Vec<f32>,
}

impl Batch {
    pub(crate) fn new(
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        vocab_size: usize,
    ) -> Result<Batch> {
        let invalid = |msg: String| Error::Invalid(format!("input_ids: {msg}"));
        let (batch_size, seq_len) = input_ids
            .dims2()
            .map_err(|_| invalid(format!("expected [batch, seq], got {:?}", input_ids.dims())))?;
        if batch_size == 0 || seq_len == 0 {
            return Err(invalid("empty batch".into()));
        }
        let ids: Vec<i64> = match input_ids.dtype() {
            DType::U32 | DType::I64 | DType::U8 => input_ids
                .flatten_all()
                .and_then(|t| t.to_dtype(DType::I64))
                .and_then(|t| t.to_vec1())
                .map_err(super::compute_error)?,
            other => return Err(invalid(format!("dtype {other:?} is not an integer type"))),
        };
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| id < 0 || id as u64 >= vocab_size as u64)
        {
            return Err(invalid(format!(
                "token id {bad} is outside the vocabulary of {vocab_size}"
            )));
        }
        let key_mask = match attention_mask {
            None => vec![1.0; batch_size * seq_len],
            Some(mask) => {
                if mask.dims() != [batch_size, seq_len] {
                    return Err(Error::Invalid(format!(
                        "attention_mask has shape {:?}, input_ids {:?}",
                        mask.dims(),
                        [batch_size, seq_len]
                    )));
                }
                let values: Vec<f32> = mask
                    .flatten_all()
                    .and_then(|t| t.to_dtype(DType::F32))
                    .and_then(|t| t.to_vec1())
                    .map_err(super::compute_error)?;
                if values.iter().any(|&v| v != 0.0 && v != 1.0) {
                    return Err(Error::Invalid(
                        "attention_mask must hold only 0 and 1".into(),
                    ));
                }
                values
            }
        };
        let ids = Tensor::from_vec(
            ids.into_iter().map(|id| id as u32).collect::<Vec<u32>>(),
            (batch_size, seq_len),
            &Device::Cpu,
        )
        .map_err(super::compute_error)?;
        Ok(Batch {
            ids,
            batch_size,
            seq_len,
            key_mask,
        })
    }

    /// Rows of `table` `[V, H]` for the ids: `[B, T, H]`.
    pub(crate) fn embed(&self, table: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = table.dim(1)?;
        table.index_select(&self.ids.flatten_all()?, 0)?.reshape((
            self.batch_size,
            self.seq_len,
            hidden,
        ))
    }

    /// The additive attention mask `[B, 1, T, T]` transformers builds from a 2D padding mask:
    /// 0 where query `i` may see key `j` (`j <= i` and key `j` is a real token), the lowest f32
    /// elsewhere. A fully masked row (a left-padding query) then softmaxes to uniform weights,
    /// as in transformers' eager attention; it only feeds positions that carry no label.
    pub(crate) fn causal_mask(&self) -> candle_core::Result<Tensor> {
        let (b, t) = (self.batch_size, self.seq_len);
        let mut mask = vec![0f32; b * t * t];
        for batch in 0..b {
            let keys = &self.key_mask[batch * t..(batch + 1) * t];
            for i in 0..t {
                let row = &mut mask[(batch * t + i) * t..(batch * t + i + 1) * t];
                for (j, value) in row.iter_mut().enumerate() {
                    if j > i || keys[j] == 0.0 {
                        *value = f32::MIN;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu)
    }
}

/// A LayerNorm or RMSNorm over the last dimension, with frozen parameters.
pub(crate) struct Norm {
    kind: NormKind,
    /// `[dim]`
    weight: Tensor,
    /// `[dim]`, LayerNorm only.
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    pub(crate) fn new(spec: &NormSpec, weight: Tensor, bias: Option<Tensor>) -> Norm {
        Norm {
            kind: spec.kind,
            weight,
            bias,
            eps: spec.eps,
        }
    }

    /// `x` `[.., dim]` -> `[.., dim]`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let normalized = match self.kind {
            // (x - mean) / sqrt(var + eps), biased variance, as torch.nn.LayerNorm.
            NormKind::LayerNorm => {
                let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
                centered.broadcast_div(&(variance + self.eps)?.sqrt()?)?
            }
            // x * rsqrt(mean(x^2) + eps), as LlamaRMSNorm.
            NormKind::RmsNorm => {
                let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_mul(&(mean_square + self.eps)?.sqrt()?.recip()?)?
            }
        };
        let scaled = normalized.broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(bias) => scaled.broadcast_add(bias),
            None => Ok(scaled),
        }
    }
}

/// `exp(x - max) / sum(exp(x - max))` over the last dimension. The max is a constant for the
/// gradient (softmax does not depend on it).
pub(crate) fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let exp = shifted.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

impl Mode<'_> {
    /// Inverted dropout as `torch.nn.functional.dropout`: in training, each element is zeroed with
    /// probability `p` and the others scaled by `1 / (1 - p)`; the identity in evaluation.
    pub(crate) fn dropout(&mut self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        match self {
            Mode::Train(rng) if p > 0.0 => {
                let keep = 1.0 - p;
                let scale = (1.0 / keep) as f32;
                let mask: Vec<f32> = (0..x.elem_count())
                    .map(|_| {
                        if rng.random::<f64>() < keep {
                            scale
                        } else {
                            0.0
                        }
                    })
                    .collect();
                x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
            }
            _ => Ok(x.clone()),
        }
    }
}

/// `x W^T` for `x` `[m, k]` and a frozen `W` `[n, k]`: `[m, n]`. Its backward gives only
/// `dL/dx = dL/dy W`; candle's own matmul would also compute (and keep) a gradient for `W`,
/// one more matmul and a weight-sized buffer per projection that nobody reads.
pub(crate) fn frozen_matmul(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })
}

struct FrozenMatmul {
    /// `[n, k]`
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, weight_k) = self.weight.dims2()?;
        if k != weight_k {
            candle_core::bail!("frozen matmul: x [{m}, {k}] against W [{n}, {weight_k}]");
        }
        // W^T as a [k, n] view of W's storage, strides (1, k): no copy.
        let weight_t = self.weight.t()?;
        let (storage, weight_t_layout) = weight_t.storage_and_layout();
        let Storage::Cpu(weight_t_storage) = &*storage else {
            candle_core::bail!("frozen matmul: the weight is not on the CPU");
        };
        let y = x.matmul(weight_t_storage, (1, m, n, k), x_layout, weight_t_layout)?;
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // dL/dx [m, k] = dL/dy [m, n] W [n, k]
        Ok(Some(grad_y.matmul(&self.weight)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn frozen_matmul_matches_matmul_and_its_input_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 12., &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        )
        .unwrap();
        let w = Tensor::arange(-5f32, 3., &dev)
            .unwrap()
            .reshape((2, 4))
            .unwrap();
        let y = frozen_matmul(x.as_tensor(), &w).unwrap();
        let expected = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            expected.to_vec2::<f32>().unwrap()
        );
        let grads = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        let expected_grads = expected
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
            expected_grads
                .get(x.as_tensor())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        );
        assert!(grads.get(&w).is_none());
    }

    #[test]
    fn causal_mask_hides_future_and_padding() {
        let ids = Tensor::new(&[[1u32, 2, 3], [4, 5, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u8, 1, 1], [1, 1, 0]], &Device::Cpu).unwrap();
        let batch = Batch::new(&ids, Some(&mask), 6).unwrap();
        // [B, 1, T, T] -> one row per (batch, query).
        let m: Vec<Vec<f32>> = batch
            .causal_mask()
            .unwrap()
            .reshape((6, 3))
            .unwrap()
            .to_vec2()
            .unwrap();
        let l = f32::MIN;
        assert_eq!(m[0], vec![0.0, l, l]);
        assert_eq!(m[2], vec![0.0, 0.0, 0.0]);
        assert_eq!(m[5], vec![0.0, 0.0, l]);
    }

    #[test]
    fn batch_rejects_out_of_vocabulary_ids_and_bad_masks() {
        let ids = Tensor::new(&[[1u32, 7]], &Device::Cpu).unwrap();
        let err = Batch::new(&ids, None, 7).err().unwrap();
        assert!(err.to_string().contains("token id 7"), "{err}");
        let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
        assert!(Batch::new(&ids, Some(&mask), 7).is_err());
    }
}
