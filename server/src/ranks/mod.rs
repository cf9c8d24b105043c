//! Tensor-parallel ranks: communicator, rendezvous, plan broadcast, launcher.

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
