//! The JSON-lines training log (`train_log.jsonl`): one line per optimizer step, flushed as it
//! is written so that a crashed or interrupted run keeps its curve.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use qlora_core::{Error, Result};
use serde::Serialize;

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRecord {
    /// 1-based optimizer step.
    pub step: usize,
    /// Epochs done, fractional (as transformers logs it).
    pub epoch: f64,
    /// Mean training loss of the step's micro-batches.
    pub loss: f64,
    /// The learning rate the step used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) tokens per second over the step.
    pub tokens_per_s: f64,
    /// Validation loss, on steps where it was computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

pub struct TrainLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl TrainLog {
    /// Creates (or truncates) the log file.
    pub fn create(path: &Path) -> Result<TrainLog> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(TrainLog {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        let line = serde_json::to_string(record).expect("a record of numbers serializes");
        writeln!(self.out, "{line}")
            .and_then(|()| self.out.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}
