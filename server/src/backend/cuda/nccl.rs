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

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result as nccl;
use cudarc::nccl::safe::NcclType;
use cudarc::nccl::sys;

use super::peer::{PeerLink, PeerMemory};
use crate::ranks::{CommError, Communicator, NcclUniqueId};

/// The NCCL communicator handle, owned here rather than through cudarc's `Comm` so collectives
/// can be enqueued on a stream other than the one the group was built with (a split prefill
/// step gathers part of its projections on the second stream while the first computes).
struct OwnedComm(sys::ncclComm_t);

// SAFETY: NCCL allows a communicator to be used from any thread provided calls on it are not
// concurrent; `OwnedComm` is only reachable through `NcclCommunicator::comm`'s Mutex, which
// serialises every call.
unsafe impl Send for OwnedComm {}

impl Drop for OwnedComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from ncclCommInitRank and is released once, here. Abort (as
        // cudarc's Comm does) rather than destroy: a peer may be gone, and destroy would wait.
        if let Err(e) = unsafe { nccl::comm_abort(self.0) } {
            tracing::warn!("NCCL communicator abort: {:?}", e.0);
        }
    }
}

pub struct NcclCommunicator {
    rank: usize,
    world_size: usize,
    stream: Arc<CudaStream>,
    comm: Mutex<OwnedComm>,
    /// The peer's memory for the one-kernel all-reduce once [`Self::connect_peer_memory`] has
    /// mapped it on both ranks, else why not.
    peer: Result<PeerLink, String>,
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
fn nccl_err(what: &str, e: nccl::NcclError) -> CommError {
    CommError::Failed(format!("NCCL {what}: {:?}", e.0))
}

fn driver_err(what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Failed(format!("CUDA {what}: {e:?}"))
}

/// NCCL's stream type from a cudarc stream.
fn raw_stream(stream: &CudaStream) -> sys::cudaStream_t {
    stream.cu_stream() as sys::cudaStream_t
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
        let ranks = i32::try_from(world_size)
            .map_err(|_| CommError::Failed(format!("world size {world_size}")))?;
        let me = i32::try_from(rank).map_err(|_| CommError::Failed(format!("rank {rank}")))?;
        let unique = sys::ncclUniqueId {
            internal: id.to_c_chars(),
        };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by a successful ncclCommInitRank and read only then.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), ranks, unique, me)
                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            comm.assume_init()
        };
        Ok(Self {
            rank,
            world_size,
            stream,
            comm: Mutex::new(OwnedComm(comm)),
            peer: Err("not connected".into()),
        })
    }

    /// Maps the peer GPU's memory for small all-reduces ([`super::peer`]; vLLM's custom
    /// all-reduce). Collective: every rank calls it once, right after [`Self::new`]; `wanted`
    /// false (`--disable-custom-all-reduce`) still takes part and leaves the pair on NCCL.
    /// Returns how small all-reduces travel (for logs and the bench's header).
    pub fn connect_peer_memory(&mut self, wanted: bool) -> Result<PeerMemory, CommError> {
        let ctx = self.stream.context().clone();
        self.peer = PeerLink::connect(&*self, &ctx, wanted)?;
        Ok(match &self.peer {
            Ok(link) => link.memory(),
            Err(why) => PeerMemory::Unused(why.clone()),
        })
    }

    /// The peer's memory, where both ranks mapped it.
    pub fn peer_link(&self) -> Option<&PeerLink> {
        self.peer.as_ref().ok()
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

    /// One NCCL call on the communicator (locked, this rank's device current) and `stream`,
    /// its error named `what`.
    fn call_on(
        &self,
        stream: &CudaStream,
        what: &str,
        call: impl FnOnce(
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<(), CommError> {
        let comm = self.comm()?;
        call(comm.0, raw_stream(stream))
            .map(|_| ())
            .map_err(|e| nccl_err(what, e))
    }

    /// In-place sum over ranks of a device buffer, enqueued on [`Self::stream`].
    pub fn all_reduce_sum_device<T: NcclType, B: DevicePtrMut<T>>(
        &self,
        buf: &mut B,
    ) -> Result<(), CommError> {
        let count = buf.len();
        self.call_on(&self.stream, "all_reduce", |comm, stream| {
            let (at, _record) = buf.device_ptr_mut(&self.stream);
            // SAFETY: `at` is `count` elements of T on this rank's device, alive (and recorded
            // against) the stream the collective is enqueued on.
            unsafe {
                nccl::all_reduce(
                    at as _,
                    at as _,
                    count,
                    T::as_nccl_type(),
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
        })
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
        let count = send.len();
        self.call_on(&self.stream, "all_gather", |comm, stream| {
            let (from, _record_send) = send.device_ptr(&self.stream);
            let (into, _record_recv) = recv.device_ptr_mut(&self.stream);
            // SAFETY: `from` holds `count` elements and `into` world_size times as many (checked
            // above), both alive on the stream the collective is enqueued on.
            unsafe {
                nccl::all_gather(from as _, into as _, count, T::as_nccl_type(), comm, stream)
            }
        })
    }

    /// `buf` of rank `root` replaces `buf` on every rank (same length everywhere).
    pub fn broadcast_device<T: NcclType, B: DevicePtrMut<T>>(
        &self,
        root: usize,
        buf: &mut B,
    ) -> Result<(), CommError> {
        let root =
            i32::try_from(root).map_err(|_| CommError::Failed(format!("broadcast root {root}")))?;
        let count = buf.len();
        self.call_on(&self.stream, "broadcast", |comm, stream| {
            let (at, _record) = buf.device_ptr_mut(&self.stream);
            // SAFETY: `at` holds `count` elements alive on the stream the collective is
            // enqueued on.
            unsafe {
                nccl::broadcast(
                    at as _,
                    at as _,
                    count,
                    T::as_nccl_type(),
                    root,
                    comm,
                    stream,
                )
            }
        })
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
        // SAFETY: the caller's contract, on this communicator's own stream.
        unsafe { self.all_gather_many_in_place_f32_on(&self.stream, bufs) }
    }

    /// [`Self::all_gather_many_in_place_f32`] enqueued on `stream` (of this rank's device). NCCL
    /// orders a communicator's collectives by their calls, not by streams: the caller must
    /// make sure this one has run before another collective is called on another stream (an
    /// event between the streams), as every rank calls them in the same order.
    ///
    /// # Safety
    /// As [`Self::all_gather_many_in_place_f32`], with the buffers alive until `stream` has run
    /// the collective.
    pub unsafe fn all_gather_many_in_place_f32_on(
        &self,
        stream: &CudaStream,
        bufs: &[(u64, usize)],
    ) -> Result<(), CommError> {
        let comm = self.comm()?;
        nccl::group_start().map_err(|e| nccl_err("group start", e))?;
        // The group must be closed whatever the calls in it did.
        let mut failed = None;
        for &(buf, share) in bufs {
            let send = buf + (self.rank * share * 4) as u64;
            // SAFETY: buf holds world_size * share f32 (the caller's contract); this rank's
            // part is the in-place send buffer NCCL allows.
            let called = unsafe {
                nccl::all_gather(
                    send as _,
                    buf as _,
                    share,
                    sys::ncclDataType_t::ncclFloat32,
                    comm.0,
                    raw_stream(stream),
                )
            };
            if let Err(e) = called {
                failed = Some(nccl_err("all_gather", e));
                break;
            }
        }
        let ended = nccl::group_end().map_err(|e| nccl_err("group end", e));
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
        self.call_on(&self.stream, "all_gather", |comm, stream| {
            let f32s = sys::ncclDataType_t::ncclFloat32;
            // SAFETY: the caller's contract.
            unsafe { nccl::all_gather(send as _, recv as _, share, f32s, comm, stream) }
        })
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
        let recv = buf + (self.rank * share * 4) as u64;
        self.call_on(&self.stream, "reduce_scatter", |comm, stream| {
            let (f32s, sum) = (sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum);
            // SAFETY: buf holds world_size * share f32 (the caller's contract); the in-place
            // form receives into this rank's part of the send buffer, as NCCL allows.
            unsafe { nccl::reduce_scatter(buf as _, recv as _, share, f32s, sum, comm, stream) }
        })
    }

    fn sync(&self) -> Result<(), CommError> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("synchronize", e))
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
