//! A collated micro-batch on the GPU: token ids, the padding mask, ALiBi positions, and the
//! next-token targets with their weights.

use qlora_core::data::{Batch, IGNORE_INDEX};
use qlora_core::{Error, Result};
use qlora_kernels::{DeviceBuffer, Gpu};

use crate::cpu::kv_cache::key_positions;

pub struct GpuBatch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// `[B * T]` u32.
    pub ids: DeviceBuffer,
    /// `[B * T]` f32: 1 real token, 0 padding.
    pub key_mask: DeviceBuffer,
    /// `[B * T]` f32: each key's position counting real tokens only (ALiBi), 0 on padding.
    pub positions: DeviceBuffer,
    /// The same positions on the host (RoPE tables are made from them).
    pub token_positions: Vec<f32>,
    /// `[count]` u32: the rows `b * T + t` that predict a label, ascending. Only these rows
    /// enter the LM head: the others have no loss and a zero gradient.
    pub labeled_rows: DeviceBuffer,
    /// `[count]` u32: the label each of those rows predicts.
    pub targets: DeviceBuffer,
    /// `[count]` f32: each labeled row's loss weight (1: every labeled position counts once).
    pub weights: DeviceBuffer,
    /// Positions the loss averages over.
    pub count: usize,
}

impl GpuBatch {
    /// Checks `batch` against the vocabulary and uploads it.
    pub fn upload(gpu: &Gpu, batch: &Batch, vocab: usize) -> Result<GpuBatch> {
        let (b, t) = (batch.batch_size, batch.seq_len);
        if b == 0 || t < 2 {
            return Err(Error::Invalid(format!(
                "a batch of {b} sequence(s) of {t} token(s) has no next token to predict"
            )));
        }
        if batch.input_ids.len() != b * t
            || batch.attention_mask.len() != b * t
            || batch.labels.len() != b * t
        {
            return Err(Error::Invalid(
                "batch tensors disagree with [batch, seq]".into(),
            ));
        }
        if let Some(&bad) = batch.input_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Invalid(format!(
                "input_ids: token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let key_mask: Vec<f32> = batch
            .attention_mask
            .iter()
            .map(|&m| if m != 0 { 1.0 } else { 0.0 })
            .collect();
        let positions = key_positions(&key_mask, b);
        let mut labeled_rows = Vec::new();
        let mut targets = Vec::new();
        for (row, labels) in batch.labels.chunks_exact(t).enumerate() {
            for (i, &label) in labels[1..].iter().enumerate() {
                if label == IGNORE_INDEX {
                    continue;
                }
                if !(0..vocab as i64).contains(&label) {
                    return Err(Error::Invalid(format!(
                        "label {label} is neither -100 nor a token id below {vocab}"
                    )));
                }
                labeled_rows.push((row * t + i) as u32);
                targets.push(label as u32);
            }
        }
        let count = targets.len();
        if count == 0 {
            return Err(Error::Invalid(
                "every label is -100: there is nothing to predict".into(),
            ));
        }
        Ok(GpuBatch {
            batch_size: b,
            seq_len: t,
            ids: gpu.upload(&batch.input_ids, "token ids")?,
            key_mask: gpu.upload(&key_mask, "the attention mask")?,
            positions: gpu.upload(&positions, "ALiBi positions")?,
            token_positions: positions,
            labeled_rows: gpu.upload(&labeled_rows, "labeled rows")?,
            targets: gpu.upload(&targets, "targets")?,
            weights: gpu.upload(&vec![1f32; count], "target weights")?,
            count,
        })
    }

    /// Rows `B * T`.
    pub fn tokens(&self) -> usize {
        self.batch_size * self.seq_len
    }
}
