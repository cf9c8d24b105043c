//! An in-process tensor-parallel group: one [`LocalComm`] per rank, each used from its own
//! thread (the bench's CPU tensor-parallel mode, tests). Sums run in rank order, so every rank
//! gets bit-identical results. A rank that stops calling collectives leaves the others waiting:
//! callers end the process when a rank fails, as the server's ranks do.

use super::{CommError, Communicator};
use std::sync::{Arc, Barrier, Mutex, PoisonError};

struct Shared {
    slots: Mutex<Vec<Vec<f32>>>,
    bytes: Mutex<Vec<u8>>,
    barrier: Barrier,
}

pub struct LocalComm {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

/// The communicators of a `world`-rank group, in rank order.
pub fn group(world: usize) -> Vec<LocalComm> {
    let shared = Arc::new(Shared {
        slots: Mutex::new(vec![Vec::new(); world]),
        bytes: Mutex::new(Vec::new()),
        barrier: Barrier::new(world),
    });
    (0..world)
        .map(|rank| LocalComm {
            rank,
            world,
            shared: shared.clone(),
        })
        .collect()
}

impl LocalComm {
    fn exchange(&self, local: &[f32]) -> Vec<Vec<f32>> {
        self.shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)[self.rank] = local.to_vec();
        self.shared.barrier.wait();
        let all = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        self.shared.barrier.wait();
        all
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        let all = self.exchange(data);
        if let Some(r) = all.iter().position(|v| v.len() != data.len()) {
            return Err(CommError::Failed(format!(
                "all_reduce: rank {r} sent {} values, this rank {}",
                all[r].len(),
                data.len()
            )));
        }
        for (i, d) in data.iter_mut().enumerate() {
            *d = all.iter().map(|v| v[i]).sum();
        }
        Ok(())
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        Ok(self.exchange(local).concat())
    }

    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> Result<(), CommError> {
        if self.rank == root {
            *self
                .shared
                .bytes
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = data.clone();
        }
        self.shared.barrier.wait();
        if self.rank != root {
            *data = self
                .shared
                .bytes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
        }
        self.shared.barrier.wait();
        Ok(())
    }
}
