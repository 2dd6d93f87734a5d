//! The ranks of a data-parallel run joined by NCCL: rendezvous for the id, then one communicator
//! per process on its GPU; the training loop's sums ([`Collective`]) go through it.

use std::time::Duration;

use qlora_core::Result;
use qlora_kernels::{Communicator, Gpu, NcclId, NCCL_ID_BYTES};

use super::env::RankEnv;
use super::rendezvous::rendezvous;
use super::DistributedError;
use crate::train::Collective;

/// This process's communicator with the other ranks.
pub struct NcclGroup {
    communicator: Communicator,
}

impl NcclGroup {
    /// Meets the other ranks of `env` (all started with arguments digested to `identity`) and
    /// joins their NCCL communicator on `gpu`. `timeout` bounds the rendezvous, the join, and
    /// every later all-reduce (the watchdog then aborts it).
    pub fn join(
        gpu: &Gpu,
        env: &RankEnv,
        identity: &str,
        timeout: Duration,
    ) -> std::result::Result<NcclGroup, DistributedError> {
        qlora_kernels::check_nccl()?;
        let id = rendezvous(env, identity, || Ok(NcclId::new()?.0.to_vec()), timeout)?;
        let id: [u8; NCCL_ID_BYTES] = id.try_into().map_err(|_| DistributedError::Rendezvous {
            master: env.master(),
            msg: "rank 0 sent an id of the wrong length".into(),
        })?;
        let communicator = Communicator::join(gpu, NcclId(id), env.rank, env.world_size, timeout)?;
        Ok(NcclGroup { communicator })
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.communicator.rank()
    }

    fn world_size(&self) -> usize {
        self.communicator.world_size()
    }

    fn sum(&self, values: &mut [f64]) -> Result<()> {
        self.communicator.sum_host_f64(values)
    }

    fn sum_device_f32(&self, ptr: u64, len: usize) -> Result<Duration> {
        self.communicator.sum_f32(ptr, len)
    }
}
