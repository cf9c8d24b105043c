//! The NCCL communicator of the CUDA backend (cudarc, NCCL loaded at run time).
//!
//! Built from the [`NcclUniqueId`] rank 0 created and the rendezvous delivered
//! ([`crate::ranks::Group::nccl_unique_id`]). The `*_device` methods are the hot path: they
//! enqueue the collective on the backend's stream and return without synchronising. The
//! [`Communicator`] impl on host slices copies through the device and synchronises; it exists
//! for tests and rare host-side collectives.
//!
//! NCCL does not notice a dead peer by itself (a collective would wait forever); the control
//! connection's heartbeats do, and [`crate::ranks::GroupHealth`] ends the process.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use cudarc::nccl::safe::{Comm, NcclType, ReduceOp};

use crate::ranks::{CommError, Communicator, NcclUniqueId};

/// Owns the NCCL communicator so it can live in a `Send + Sync` [`NcclCommunicator`].
struct OwnedComm(Comm);

// SAFETY: NCCL allows a communicator to be used from any thread provided calls on it are not
// concurrent; `OwnedComm` is only reachable through `NcclCommunicator::comm`'s Mutex, which
// serialises every call. The stream it holds is itself Send + Sync in cudarc.
unsafe impl Send for OwnedComm {}

pub struct NcclCommunicator {
    rank: usize,
    world_size: usize,
    stream: Arc<CudaStream>,
    comm: Mutex<OwnedComm>,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

/// cudarc's NCCL error prints no code of its own: name the `ncclResult_t`.
fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> CommError {
    CommError::Failed(format!("NCCL {what}: {:?}", e.0))
}

fn driver_err(what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Failed(format!("CUDA {what}: {e:?}"))
}

impl NcclCommunicator {
    /// Joins the NCCL group; blocks until every rank has called it (bounded by the group's
    /// heartbeats: a rank that dies meanwhile ends the process through `GroupHealth`).
    pub fn new(
        stream: Arc<CudaStream>,
        rank: usize,
        world_size: usize,
        id: &NcclUniqueId,
    ) -> Result<Self, CommError> {
        // ncclCommInitRank joins on the thread's current device.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("bind context", e))?;
        let comm = Comm::from_rank(stream.clone(), rank, world_size, id.to_cudarc())
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(Self {
            rank,
            world_size,
            stream,
            comm: Mutex::new(OwnedComm(comm)),
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The communicator, with this rank's device current on the calling thread (NCCL launches
    /// on the current device).
    fn comm(&self) -> Result<MutexGuard<'_, OwnedComm>, CommError> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("bind context", e))?;
        Ok(self.comm.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// In-place sum over ranks of a device buffer, enqueued on [`Self::stream`].
    pub fn all_reduce_sum_device<T: NcclType, B: DevicePtrMut<T>>(
        &self,
        buf: &mut B,
    ) -> Result<(), CommError> {
        self.comm()?
            .0
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map(|_| ())
            .map_err(|e| nccl_err("all_reduce", e))
    }

    /// `recv` (world_size x `send.len()`) gets every rank's `send` in rank order.
    pub fn all_gather_device<T: NcclType, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: &S,
        recv: &mut R,
    ) -> Result<(), CommError> {
        if recv.len() != send.len() * self.world_size {
            return Err(CommError::Failed(format!(
                "all_gather: receive buffer holds {} elements, needs {} x {}",
                recv.len(),
                self.world_size,
                send.len()
            )));
        }
        self.comm()?
            .0
            .all_gather(send, recv)
            .map(|_| ())
            .map_err(|e| nccl_err("all_gather", e))
    }

    /// `buf` of rank `root` replaces `buf` on every rank (same length everywhere).
    pub fn broadcast_device<T: NcclType, B: DevicePtrMut<T>>(
        &self,
        root: usize,
        buf: &mut B,
    ) -> Result<(), CommError> {
        let root =
            i32::try_from(root).map_err(|_| CommError::Failed(format!("broadcast root {root}")))?;
        self.comm()?
            .0
            .broadcast_in_place(buf, root)
            .map(|_| ())
            .map_err(|e| nccl_err("broadcast", e))
    }

    /// In-place all-gathers over buffers `(buf, share)` of `world_size x share` f32 each: this
    /// rank's `share` values at `buf + rank x share` reach every rank's same place. One NCCL group
    /// (one launch moves them all, so narrow buffers cost no launch of their own), enqueued on
    /// [`Self::stream`].
    ///
    /// # Safety
    /// Each `buf` must be a device allocation of at least `world_size * share` f32 that stays
    /// alive until the stream has run the collective; the buffers must be disjoint.
    pub unsafe fn all_gather_many_in_place_f32(
        &self,
        bufs: &[(u64, usize)],
    ) -> Result<(), CommError> {
        let comm = self.comm()?;
        cudarc::nccl::result::group_start().map_err(|e| nccl_err("group start", e))?;
        // The group must be closed whatever the calls in it did.
        let mut failed = None;
        for &(buf, share) in bufs {
            let send = RawSpan::new(&self.stream, buf + (self.rank * share * 4) as u64, share);
            let mut recv = RawSpan::new(&self.stream, buf, self.world_size * share);
            if let Err(e) = comm.0.all_gather(&send, &mut recv) {
                failed = Some(nccl_err("all_gather", e));
                break;
            }
        }
        let ended = cudarc::nccl::result::group_end().map_err(|e| nccl_err("group end", e));
        match failed {
            Some(e) => Err(e),
            None => ended.map(|_| ()),
        }
    }

    /// `world_size x share` f32 at `recv` get every rank's `share` values at `send`, in rank
    /// order. Enqueued on [`Self::stream`].
    ///
    /// # Safety
    /// `send` must hold `share` f32 and `recv` `world_size * share`, both device allocations
    /// alive until the stream has run the collective; they overlap only as the in-place form.
    pub unsafe fn all_gather_raw_f32(
        &self,
        send: u64,
        recv: u64,
        share: usize,
    ) -> Result<(), CommError> {
        let send = RawSpan::new(&self.stream, send, share);
        let mut recv = RawSpan::new(&self.stream, recv, self.world_size * share);
        self.comm()?
            .0
            .all_gather(&send, &mut recv)
            .map(|_| ())
            .map_err(|e| nccl_err("all_gather", e))
    }

    /// In-place reduce-scatter (sum) over `world_size x share` f32 at `buf`: afterwards this
    /// rank's `share` values at `buf + rank x share` are the sum over ranks of that part (the
    /// rest of the buffer is left undefined). Enqueued on [`Self::stream`].
    ///
    /// # Safety
    /// As [`Self::all_gather_many_in_place_f32`] for one buffer.
    pub unsafe fn reduce_scatter_in_place_f32(
        &self,
        buf: u64,
        share: usize,
    ) -> Result<(), CommError> {
        let send = RawSpan::new(&self.stream, buf, self.world_size * share);
        let mut recv = RawSpan::new(&self.stream, buf + (self.rank * share * 4) as u64, share);
        self.comm()?
            .0
            .reduce_scatter(&send, &mut recv, &ReduceOp::Sum)
            .map(|_| ())
            .map_err(|e| nccl_err("reduce_scatter", e))
    }

    fn sync(&self) -> Result<(), CommError> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("synchronize", e))
    }
}

/// f32 device memory named by address and length, so a collective can work on parts of one
/// buffer in place (cudarc's slices would borrow the buffer twice). Its pointer carries no
/// event: the collective is enqueued on the same stream as every producer and consumer.
struct RawSpan<'s> {
    ptr: u64,
    len: usize,
    stream: &'s Arc<CudaStream>,
}

impl<'s> RawSpan<'s> {
    fn new(stream: &'s Arc<CudaStream>, ptr: u64, len: usize) -> Self {
        Self { ptr, len, stream }
    }
}

impl DeviceSlice<f32> for RawSpan<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}

impl DevicePtr<f32> for RawSpan<'_> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl DevicePtrMut<f32> for RawSpan<'_> {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn nccl(&self) -> Option<&NcclCommunicator> {
        Some(self)
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        if data.is_empty() {
            return self.barrier_device();
        }
        let mut dev = self
            .stream
            .clone_htod(data)
            .map_err(|e| driver_err("copy to device", e))?;
        self.all_reduce_sum_device(&mut dev)?;
        self.stream
            .memcpy_dtoh(&dev, data)
            .map_err(|e| driver_err("copy to host", e))?;
        self.sync()
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        if local.is_empty() {
            return Ok(Vec::new());
        }
        let send = self
            .stream
            .clone_htod(local)
            .map_err(|e| driver_err("copy to device", e))?;
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(local.len() * self.world_size)
            .map_err(|e| driver_err("alloc", e))?;
        self.all_gather_device(&send, &mut recv)?;
        let out = self
            .stream
            .clone_dtoh(&recv)
            .map_err(|e| driver_err("copy to host", e))?;
        self.sync()?;
        Ok(out)
    }

    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> Result<(), CommError> {
        if root >= self.world_size {
            return Err(CommError::Failed(format!(
                "broadcast root {root} is not a rank of a group of {}",
                self.world_size
            )));
        }
        // Only the root knows the length: broadcast it first.
        let mut len = self
            .stream
            .clone_htod(&[data.len() as u64])
            .map_err(|e| driver_err("copy to device", e))?;
        self.broadcast_device(root, &mut len)?;
        let n = self
            .stream
            .clone_dtoh(&len)
            .map_err(|e| driver_err("copy to host", e))?;
        self.sync()?;
        let n = usize::try_from(n.first().copied().unwrap_or(0))
            .map_err(|_| CommError::Failed("broadcast length overflows usize".into()))?;
        if n == 0 {
            data.clear();
            return Ok(());
        }
        data.resize(n, 0);
        let mut dev = self
            .stream
            .clone_htod(&data[..])
            .map_err(|e| driver_err("copy to device", e))?;
        self.broadcast_device(root, &mut dev)?;
        self.stream
            .memcpy_dtoh(&dev, &mut data[..])
            .map_err(|e| driver_err("copy to host", e))?;
        self.sync()
    }
}

impl NcclCommunicator {
    fn barrier_device(&self) -> Result<(), CommError> {
        let mut one = self
            .stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| driver_err("alloc", e))?;
        self.all_reduce_sum_device(&mut one)?;
        self.sync()
    }
}
