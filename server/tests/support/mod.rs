//! Test support: repository paths, the tiny model's checkpoint, transformers reference checks
//! (`reference`), and an in-process tensor-parallel group.
#![allow(dead_code)]

pub mod reference;

use dspark_server::engine::weights::Checkpoint;
use std::path::{Path, PathBuf};

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The tiny model shipped in the repo, through the real checkpoint layer.
pub fn tiny_checkpoint() -> Checkpoint {
    Checkpoint::open(&repo_path("assets/tiny-dsv4")).unwrap()
}

/// The fixture script's intermediate tensors (names pass through unchanged).
pub fn components() -> Checkpoint {
    Checkpoint::open_files(&[repo_path("tests/fixtures/components.safetensors")]).unwrap()
}

pub fn f32s(c: &Checkpoint, name: &str) -> Vec<f32> {
    c.tensor_f32(name).unwrap().data
}

pub fn i64s(c: &Checkpoint, name: &str) -> Vec<i64> {
    c.tensor_i64(name).unwrap().1
}

/// An in-process tensor-parallel group for tests: one `LocalComm` per rank, each used from its
/// own thread. Sums run in rank order, so every rank gets bit-identical results.
pub mod local_group {
    use dspark_server::ranks::{CommError, Communicator};
    use std::sync::{Arc, Barrier, Mutex};

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
            self.shared.slots.lock().unwrap()[self.rank] = local.to_vec();
            self.shared.barrier.wait();
            let all = self.shared.slots.lock().unwrap().clone();
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
                *self.shared.bytes.lock().unwrap() = data.clone();
            }
            self.shared.barrier.wait();
            if self.rank != root {
                *data = self.shared.bytes.lock().unwrap().clone();
            }
            self.shared.barrier.wait();
            Ok(())
        }
    }
}
