//! `dspark-server bench --world-size N`: the ranks of a tensor-parallel group in this process,
//! rank `r` on its own thread (and, on CUDA, GPU `r`, joined over NCCL; on the CPU, over an
//! in-process group). Rank 0 is driven by the bench; the others run the same plans in the same
//! order, as followers do in the server. A collective cannot be abandoned half way, so a rank
//! whose step fails ends the whole process with its error (the server's ranks fail together the
//! same way).

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::engine::model::{self, checkpoint_source, Device, LoadOptions, ModelConfig, Shard};
use crate::engine::{EngineError, KvLayout, ModelRunner, OpTime, StepOutput, StepPlan};
use crate::ranks::Communicator;

use super::BenchError;

enum Work {
    Step(StepPlan),
    Fill(Vec<u32>, Vec<u32>, u64),
    Release(u64),
}

struct Follower {
    work: mpsc::Sender<Work>,
    done: mpsc::Receiver<Result<bool, String>>,
    thread: Option<JoinHandle<()>>,
}

/// Rank 0's runner, which hands every call to the other ranks too.
pub struct TensorParallelRunner {
    local: Box<dyn ModelRunner>,
    followers: Vec<Follower>,
    /// How rank 0's small all-reduces travel (the report's header).
    pub all_reduce: String,
}

/// Ends the process: a rank failed while the others may wait in a collective for it.
fn fail_group(rank: usize, what: &str) -> ! {
    tracing::error!(rank, "tensor-parallel bench: {what}; stopping every rank");
    eprintln!("dspark-server bench: rank {rank}: {what}");
    std::process::exit(1)
}

/// On the CPU, every rank's in-process communicator, made up front; on CUDA `None` each, since
/// NCCL's join is collective and happens on each rank's own thread (see `build`).
fn cpu_communicators(device: Device, world: usize) -> Vec<Option<Arc<dyn Communicator>>> {
    match device {
        Device::Cpu => crate::ranks::local::group(world)
            .into_iter()
            .map(|c| Some(Arc::new(c) as Arc<dyn Communicator>))
            .collect(),
        Device::Cuda => (0..world).map(|_| None).collect(),
    }
}

/// Builds every rank's model (concurrently: NCCL's join and the loads overlap) and returns
/// rank 0's runner driving the others.
pub fn build(
    cfg: &ModelConfig,
    opts: &LoadOptions,
    world: usize,
    dir: &std::path::Path,
    peer_all_reduce: bool,
) -> Result<TensorParallelRunner, BenchError> {
    if opts.device == Device::Cuda {
        let gpus =
            crate::backend::cuda::gpu_count().map_err(|e| BenchError::Args(e.to_string()))?;
        if gpus < world {
            return Err(BenchError::Args(format!(
                "--world-size {world} on CUDA puts rank r on GPU r; this machine has {gpus}"
            )));
        }
    }
    let nccl_id = match opts.device {
        Device::Cuda => Some(
            crate::ranks::NcclUniqueId::create()
                .map_err(|e| BenchError::Args(format!("cannot make an NCCL id: {e}")))?,
        ),
        Device::Cpu => None,
    };
    let mut comms = cpu_communicators(opts.device, world).into_iter();
    // Each rank's communicator and how its small all-reduces travel.
    let comm_for = move |rank: usize,
                         local: Option<Arc<dyn Communicator>>|
          -> Result<(Arc<dyn Communicator>, String), String> {
        if let Some(c) = local {
            return Ok((c, "in-process group".into()));
        }
        let Some(id) = nccl_id.as_ref() else {
            return Err("no communicator".into());
        };
        let stream = crate::backend::cuda::group_stream(rank).map_err(|e| e.to_string())?;
        let mut comm = crate::backend::cuda::nccl::NcclCommunicator::new(stream, rank, world, id)
            .map_err(|e| format!("cannot join the NCCL group: {e}"))?;
        let small_sums = comm
            .connect_peer_memory(peer_all_reduce)
            .map_err(|e| format!("cannot set up the peer all-reduce: {e}"))?
            .to_string();
        tracing::info!(rank, all_reduce = %small_sums, "NCCL communicator ready");
        Ok((Arc::new(comm), small_sums))
    };
    let comm_for = Arc::new(comm_for);
    let rank_opts = |rank: usize| LoadOptions {
        shard: Shard {
            rank,
            world_size: world,
        },
        gpu_ordinal: rank,
        ..opts.clone()
    };
    let load = {
        let cfg = cfg.clone();
        let dir = dir.to_path_buf();
        move |opts: LoadOptions,
              comm: Arc<dyn Communicator>|
              -> Result<Box<dyn ModelRunner>, String> {
            let ckpt = checkpoint_source::open(&dir, &cfg, &opts).map_err(|e| e.to_string())?;
            model::build(cfg.clone(), &ckpt, &opts, comm).map_err(|e| e.to_string())
        }
    };
    let mut followers = Vec::with_capacity(world.saturating_sub(1));
    let local_comm = comms.next().flatten();
    for rank in 1..world {
        let (work_tx, work_rx) = mpsc::channel::<Work>();
        let (done_tx, done_rx) = mpsc::channel::<Result<bool, String>>();
        let (opts, comm, comm_for, load) = (
            rank_opts(rank),
            comms.next().flatten(),
            comm_for.clone(),
            load.clone(),
        );
        let thread = std::thread::Builder::new()
            .name(format!("bench-rank-{rank}"))
            .spawn(move || {
                let built = comm_for(rank, comm).and_then(|(c, _)| load(opts, c));
                let mut runner = match built {
                    Ok(r) => {
                        let _ = done_tx.send(Ok(true));
                        r
                    }
                    Err(e) => {
                        let _ = done_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(work) = work_rx.recv() {
                    let result = match work {
                        Work::Step(plan) => runner.step(&plan).map(|_| true),
                        Work::Fill(blocks, recent, seed) => {
                            runner.fill_blocks_random(&blocks, &recent, seed)
                        }
                        Work::Release(id) => {
                            runner.release(id);
                            Ok(true)
                        }
                    };
                    match result {
                        Ok(v) => {
                            let _ = done_tx.send(Ok(v));
                        }
                        Err(e) => fail_group(rank, &e.to_string()),
                    }
                }
            })
            .map_err(|e| BenchError::Args(format!("cannot start rank {rank}: {e}")))?;
        followers.push(Follower {
            work: work_tx,
            done: done_rx,
            thread: Some(thread),
        });
    }
    let mut all_reduce = String::new();
    let local = comm_for(0, local_comm).and_then(|(c, how)| {
        all_reduce = how;
        load(rank_opts(0), c)
    });
    for (i, f) in followers.iter().enumerate() {
        match f.done.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => fail_group(i + 1, &format!("loading: {e}")),
            Err(_) => fail_group(i + 1, "loading: the rank's thread ended"),
        }
    }
    let local = local.map_err(|e| BenchError::Args(format!("rank 0: {e}")))?;
    Ok(TensorParallelRunner {
        local,
        followers,
        all_reduce,
    })
}

impl TensorParallelRunner {
    fn send(&self, work: impl Fn() -> Work) {
        for (i, f) in self.followers.iter().enumerate() {
            if f.work.send(work()).is_err() {
                fail_group(i + 1, "the rank's thread ended");
            }
        }
    }

    /// Every follower's answer to the last call; all of them agree with rank 0 or the process
    /// has ended.
    fn collect(&self) -> bool {
        let mut all = true;
        for (i, f) in self.followers.iter().enumerate() {
            match f.done.recv() {
                Ok(Ok(v)) => all &= v,
                Ok(Err(e)) => fail_group(i + 1, &e),
                Err(_) => fail_group(i + 1, "the rank's thread ended"),
            }
        }
        all
    }
}

impl ModelRunner for TensorParallelRunner {
    fn kv_layout(&self) -> KvLayout {
        self.local.kv_layout()
    }

    fn vocab_size(&self) -> usize {
        self.local.vocab_size()
    }

    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        self.send(|| Work::Step(plan.clone()));
        let out = match self.local.step(plan) {
            Ok(out) => out,
            Err(e) => fail_group(0, &e.to_string()),
        };
        self.collect();
        Ok(out)
    }

    fn release(&mut self, seq_id: u64) {
        self.send(|| Work::Release(seq_id));
        self.local.release(seq_id);
        self.collect();
    }

    fn fill_blocks_random(
        &mut self,
        blocks: &[u32],
        recent: &[u32],
        seed: u64,
    ) -> Result<bool, EngineError> {
        self.send(|| Work::Fill(blocks.to_vec(), recent.to_vec(), seed));
        let local = match self.local.fill_blocks_random(blocks, recent, seed) {
            Ok(v) => v,
            Err(e) => fail_group(0, &e.to_string()),
        };
        let others = self.collect();
        if local != others {
            fail_group(0, "ranks disagree on whether they can fill KV blocks");
        }
        Ok(local)
    }

    fn backend_time(&self) -> Vec<OpTime> {
        self.local.backend_time()
    }
}

impl Drop for TensorParallelRunner {
    fn drop(&mut self) {
        for f in &mut self.followers {
            // Closing the channel ends the follower's loop.
            let (closed, _) = mpsc::channel();
            drop(std::mem::replace(&mut f.work, closed));
            if let Some(t) = f.thread.take() {
                let _ = t.join();
            }
        }
    }
}
