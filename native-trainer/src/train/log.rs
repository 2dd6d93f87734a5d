//! The JSON-lines training log (`train_log.jsonl`): one line per optimizer step, flushed as it
//! is written so that a crashed or interrupted run keeps its curve. A resumed run keeps the
//! lines up to its checkpoint and appends to them.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use qlora_core::fsutil::AtomicFile;
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
    /// Milliseconds the all-reduce of the step's gradient took (data-parallel runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_ms: Option<f64>,
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

    /// Opens the log of a run resumed after `steps` steps: its first `steps` lines (which must
    /// be steps 1 to `steps`) are kept, any later ones (a killed run may have logged steps past
    /// its last checkpoint, the last line perhaps torn) are removed, and new lines are appended.
    pub fn resume(path: &Path, steps: usize) -> Result<TrainLog> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        // Bytes and lines kept: whole lines (newline included) of steps 1, 2, ...
        let (mut kept, mut logged) = (0, 0);
        for line in text.split(|&b| b == b'\n') {
            if logged == steps || kept + line.len() >= text.len() {
                // Done, or at the unterminated (empty or torn) end of the file.
                break;
            }
            let step = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64());
            if step != Some(logged as u64 + 1) {
                return Err(Error::format(
                    format!("{}:{}", path.display(), logged + 1),
                    format!(
                        "expected the record of step {}: the log does not belong to the \
                         checkpoint's run",
                        logged + 1
                    ),
                ));
            }
            kept += line.len() + 1;
            logged += 1;
        }
        if logged < steps {
            return Err(Error::format(
                path.display(),
                format!("the log has {logged} steps, fewer than the checkpoint's {steps}"),
            ));
        }
        if kept < text.len() {
            let mut file = AtomicFile::create(path)?;
            file.write_all(&text[..kept])
                .map_err(|e| Error::io(path, e))?;
            file.commit()?;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(TrainLog {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Makes the lines written so far durable (a checkpoint claims them).
    pub fn sync(&mut self) -> Result<()> {
        self.out
            .flush()
            .and_then(|()| self.out.get_ref().sync_data())
            .map_err(|e| Error::io(&self.path, e))
    }

    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        let line = serde_json::to_string(record).expect("a record of numbers serializes");
        writeln!(self.out, "{line}")
            .and_then(|()| self.out.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: usize) -> StepRecord {
        StepRecord {
            step,
            epoch: 0.5,
            loss: 1.0,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens_per_s: 10.0,
            allreduce_ms: None,
            val_loss: None,
        }
    }

    #[test]
    fn resuming_keeps_the_checkpoint_steps_and_drops_later_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let mut log = TrainLog::create(&path).unwrap();
        (1..=4).for_each(|s| log.write(&record(s)).unwrap());
        drop(log);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"step\": 5, \"ep");
        std::fs::write(&path, &text).unwrap();

        let mut log = TrainLog::resume(&path, 2).unwrap();
        log.write(&record(3)).unwrap();
        drop(log);
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2, 3]);

        let err = TrainLog::resume(&path, 5).err().unwrap().to_string();
        assert!(
            err.contains("the log has 3 steps, fewer than the checkpoint's 5"),
            "{err}"
        );
        std::fs::write(&path, "{\"step\": 2}\n").unwrap();
        let err = TrainLog::resume(&path, 1).err().unwrap().to_string();
        assert!(
            err.contains("log.jsonl:1: expected the record of step 1"),
            "{err}"
        );
    }
}
