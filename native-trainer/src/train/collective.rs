//! The processes of a data-parallel run as the training loop sees them: its rank, how many there
//! are, and sums over all of them. One process ([`SingleProcess`]) is the run of one.

use std::time::Duration;

use qlora_core::Result;

/// Sums over the ranks of a data-parallel run; every rank calls each method at the same point,
/// in the same order, and gets the same sums.
pub trait Collective {
    /// This process's rank, 0-based (rank 0 writes the files).
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// Replaces each of `values` by its sum over the ranks.
    fn sum(&self, values: &mut [f64]) -> Result<()>;

    /// Replaces the `len` f32 at device address `ptr` (of this rank's GPU) by their sums over
    /// the ranks; returns how long that took.
    fn sum_device_f32(&self, ptr: u64, len: usize) -> Result<Duration>;
}

/// A run of one process: every sum is the value itself.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn sum(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn sum_device_f32(&self, _ptr: u64, _len: usize) -> Result<Duration> {
        Ok(Duration::ZERO)
    }
}
