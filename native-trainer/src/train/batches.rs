//! Examples into batches: a seeded shuffle per epoch, micro-batches of `batch_size`, their
//! counts, and the tensors the CPU model takes.

use candle_core::{Device, Tensor};
use qlora_core::data::{Batch, IGNORE_INDEX};
use qlora_core::Result;
use rand::seq::SliceRandom;
use rand::Rng;

/// One collated micro-batch as the CPU model's tensors.
pub struct BatchTensors {
    /// `[B, T]` u32
    pub input_ids: Tensor,
    /// `[B, T]` u32, 1 on real tokens
    pub attention_mask: Tensor,
    /// `[B, T]` i64, `-100` where there is no target
    pub labels: Tensor,
}

impl BatchTensors {
    pub fn new(batch: &Batch) -> Result<Self> {
        let shape = (batch.batch_size, batch.seq_len);
        let tensor = |t: candle_core::Result<Tensor>| t.map_err(crate::cpu::compute_error);
        Ok(BatchTensors {
            input_ids: tensor(Tensor::from_slice(&batch.input_ids, shape, &Device::Cpu))?,
            attention_mask: tensor(Tensor::from_slice(
                &batch.attention_mask,
                shape,
                &Device::Cpu,
            ))?,
            labels: tensor(Tensor::from_slice(&batch.labels, shape, &Device::Cpu))?,
        })
    }
}

/// Real (non-padding) tokens of a batch.
pub fn real_tokens(batch: &Batch) -> usize {
    batch.attention_mask.iter().filter(|&&m| m != 0).count()
}

/// Positions the loss averages over: labels after the first position that are not `-100`.
pub fn loss_targets(batch: &Batch) -> usize {
    batch
        .labels
        .chunks_exact(batch.seq_len.max(1))
        .map(|row| row[1..].iter().filter(|&&l| l != IGNORE_INDEX).count())
        .sum()
}

/// The micro-batches of one epoch: example indices shuffled with `rng`, cut into groups of
/// `batch_size` (the last one may be smaller).
pub fn epoch_batches(examples: usize, batch_size: usize, rng: &mut impl Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples).collect();
    order.shuffle(rng);
    order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// Micro-batches per epoch.
pub fn batches_per_epoch(examples: usize, batch_size: usize) -> usize {
    examples.div_ceil(batch_size.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_core::data::Example;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn epochs_cover_every_example_once_and_depend_on_the_seed() {
        let mut rng = StdRng::seed_from_u64(7);
        let first = epoch_batches(10, 4, &mut rng);
        assert_eq!(first.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        let mut seen: Vec<usize> = first.concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let again = epoch_batches(10, 4, &mut StdRng::seed_from_u64(7));
        assert_eq!(first, again);
        assert_eq!(batches_per_epoch(10, 4), 3);
    }

    #[test]
    fn batches_count_real_tokens_and_targets() {
        let a = Example {
            input_ids: vec![5, 6, 7],
            labels: vec![IGNORE_INDEX, 6, 7],
            line: 1,
        };
        let b = Example {
            input_ids: vec![5, 8],
            labels: vec![IGNORE_INDEX, 8],
            line: 2,
        };
        let batch = qlora_core::data::collate(&[&a, &b], 0, true);
        assert_eq!(BatchTensors::new(&batch).unwrap().input_ids.dims(), [2, 3]);
        assert_eq!((real_tokens(&batch), loss_targets(&batch)), (5, 3));
    }
}
