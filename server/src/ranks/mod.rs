//! Tensor-parallel ranks: communicator, rendezvous, plan broadcast, fail-together, launcher.
//!
//! Rank 0 runs the API and scheduler and sends each step's plan to the other ranks, which run the
//! same step on their shard ([`run_follower`]). Protocol and timeouts: `docs/RANKS.md`.

mod config;
mod control;
mod health;
mod launcher;
pub mod local;
mod rendezvous;
mod tcp;
pub(crate) mod wire;

#[cfg(test)]
mod tests;

pub use config::{ConfigError, GroupFingerprint, NcclUniqueId, RankConfig, DEFAULT_CONTROL_PORT};
pub use control::{
    run_follower, FollowerError, LeaderRunner, PlanBroadcaster, PlanMessage, PlanReceiver,
};
pub use health::{FailPolicy, GroupHealth, GroupState, EXIT_PEER_LOST};
pub use launcher::{launch_local, launch_local_with, KILL_GRACE};
pub use rendezvous::{rendezvous, rendezvous_leader_on, Group, RendezvousError, Role};
pub use tcp::TcpCommunicator;
pub use wire::PROTOCOL_VERSION;

/// Collective operations between the ranks of one group. The TCP implementation serves the CPU
/// backend (tests, demo); the NCCL one serves the CUDA backend.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In-place element-wise sum over all ranks; every rank ends with the same values.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError>;
    /// Every rank's `local` (all the same length), concatenated in rank order.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError>;
    /// `data` of rank `root` replaces `data` on every other rank.
    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> Result<(), CommError>;
    /// The NCCL communicator behind this one, for collectives on device buffers enqueued on
    /// the GPU stream (the CUDA backend's layer stack); `None` for host-only communicators.
    fn nccl(&self) -> Option<&crate::backend::cuda::nccl::NcclCommunicator> {
        None
    }
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CommError> {
        // A sum needs every rank's input before anyone gets the result.
        self.all_reduce_sum(&mut [0.0])
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("peer rank {rank} lost: {reason}")]
    PeerLost { rank: usize, reason: String },
    #[error("collective failed: {0}")]
    Failed(String),
}

/// The communicator of a group of one: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _data: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        Ok(local.to_vec())
    }
    fn broadcast_bytes(&self, _root: usize, _data: &mut Vec<u8>) -> Result<(), CommError> {
        Ok(())
    }
}
