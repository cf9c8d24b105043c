//! Peer memory between the two GPUs of a tensor-parallel pair, for the one-kernel all-reduce of
//! decode steps (`dspark_kernels::launch::collective`; vLLM calls its counterpart the custom
//! all-reduce). Each rank allocates a region the other maps: in one process (the bench's ranks
//! are threads) through peer access and the shared address space, across processes on one host
//! (the server's local group, two pods on one node that both see the two GPUs) through CUDA
//! IPC. Where neither works (two hosts, as the operator places its pods; processes that each
//! see one GPU) the pair keeps NCCL.
//!
//! Setting up is collective: both ranks exchange what they have over NCCL and use the peer
//! path only if both mapped the other's region, so a rank that could not (or was told not to)
//! never leaves the other waiting in a kernel.

use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::{self, CUdeviceptr, CUresult};
use cudarc::driver::CudaContext;
use dspark_kernels::launch::collective::{PeerAllReduce, PeerRegion, PEER_EPOCH_BYTES};

use crate::ranks::{CommError, Communicator};

/// f32 values one peer all-reduce may carry (4 MiB): a decode or verify step of up to 256 rows
/// of a 4,096-wide hidden state. Larger sums (prefill) go to NCCL, built for bandwidth.
pub const PEER_CAP: usize = 1 << 20;

/// Whether this rank offers its memory for the peer all-reduce: only where
/// `DSPARK_CUSTOM_ALL_REDUCE=1` opts in (off by default until the kernel has been measured on
/// two GPUs: docs/CUDA.md), and never with `--disable-custom-all-reduce` (vLLM's flag).
pub fn peer_all_reduce_wanted(disabled_by_flag: bool) -> bool {
    opted_in(std::env::var("DSPARK_CUSTOM_ALL_REDUCE").ok().as_deref()) && !disabled_by_flag
}

fn opted_in(value: Option<&str>) -> bool {
    value.is_some_and(|v| matches!(v.trim(), "1" | "true" | "on"))
}

/// How the two ranks' regions are mapped, or why they are not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMemory {
    /// Both ranks in this process: the peer's pointer, with peer access enabled.
    SameProcess,
    /// Two processes on one host: the peer's region opened from its CUDA IPC handle.
    CudaIpc,
    /// Not used; NCCL carries every all-reduce.
    Unused(String),
}

impl std::fmt::Display for PeerMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SameProcess => f.write_str("peer memory (one process)"),
            Self::CudaIpc => f.write_str("peer memory (CUDA IPC)"),
            Self::Unused(why) => write!(f, "NCCL only ({why})"),
        }
    }
}

/// Identifies this process among every process that may share a host or a pid (pods have their
/// own pid namespaces): a random value fixed for the process's life.
fn process_token() -> u64 {
    static TOKEN: OnceLock<u64> = OnceLock::new();
    *TOKEN.get_or_init(|| {
        use std::hash::BuildHasher;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::collections::hash_map::RandomState::new().hash_one((std::process::id(), nanos))
    })
}

/// The running kernel's boot id: equal for processes (containers included) on one host.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// What one rank tells the other.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PeerRecord {
    /// Whether the rank allocated its region and wants the peer path.
    offered: bool,
    process: u64,
    ordinal: u32,
    region: u64,
    cap: u64,
    /// The region's CUDA IPC handle, where the driver gave one.
    ipc: Option<[u8; 64]>,
    boot_id: String,
}

const RECORD_VERSION: u8 = 1;

impl PeerRecord {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![RECORD_VERSION, u8::from(self.offered)];
        b.extend_from_slice(&self.process.to_le_bytes());
        b.extend_from_slice(&self.ordinal.to_le_bytes());
        b.extend_from_slice(&self.region.to_le_bytes());
        b.extend_from_slice(&self.cap.to_le_bytes());
        b.push(u8::from(self.ipc.is_some()));
        b.extend_from_slice(&self.ipc.unwrap_or([0; 64]));
        b.extend_from_slice(self.boot_id.as_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Self, String> {
        const FIXED: usize = 2 + 8 + 4 + 8 + 8 + 1 + 64;
        if b.len() < FIXED || b[0] != RECORD_VERSION {
            return Err(format!(
                "peer record of {} bytes, version {:?}",
                b.len(),
                b.first()
            ));
        }
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(v)
        };
        let mut ordinal = [0u8; 4];
        ordinal.copy_from_slice(&b[10..14]);
        let mut ipc = [0u8; 64];
        ipc.copy_from_slice(&b[31..95]);
        Ok(Self {
            offered: b[1] != 0,
            process: u64_at(2),
            ordinal: u32::from_le_bytes(ordinal),
            region: u64_at(14),
            cap: u64_at(22),
            ipc: (b[30] != 0).then_some(ipc),
            boot_id: String::from_utf8_lossy(&b[FIXED..]).into_owned(),
        })
    }
}

fn cuda(what: &str, r: CUresult) -> Result<(), String> {
    match r {
        CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(format!("{what}: {e:?}")),
    }
}

/// A device allocation of its own (`cuMemAlloc`, which CUDA IPC can export; the stream-ordered
/// pool's cannot), freed on drop.
struct DeviceAlloc {
    ctx: Arc<CudaContext>,
    at: CUdeviceptr,
}

impl DeviceAlloc {
    fn zeroed(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, String> {
        ctx.bind_to_thread()
            .map_err(|e| format!("bind context: {e:?}"))?;
        let mut at = 0;
        // SAFETY: `at` is written by a successful allocation of `bytes`, then zeroed whole and
        // synchronised before anyone (the peer included) can see the pointer.
        unsafe {
            cuda("cuMemAlloc", sys::cuMemAlloc_v2(&mut at, bytes))?;
            let alloc = Self {
                ctx: ctx.clone(),
                at,
            };
            cuda("cuMemsetD8", sys::cuMemsetD8_v2(at, 0, bytes))?;
            cuda("cuCtxSynchronize", sys::cuCtxSynchronize())?;
            Ok(alloc)
        }
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by cuMemAlloc in this context and freed once, here; the pair's
            // kernels that used it have run (the group stops together).
            let _ = unsafe { sys::cuMemFree_v2(self.at) };
        }
    }
}

/// The peer's region as mapped here, at `at`; an IPC mapping is closed on drop.
struct PeerMapping {
    at: CUdeviceptr,
    how: MappedBy,
}

enum MappedBy {
    /// Keeps the peer's context alive while its pointer is used.
    SameProcess {
        _peer: Arc<CudaContext>,
    },
    Ipc {
        ctx: Arc<CudaContext>,
    },
}

impl Drop for PeerMapping {
    fn drop(&mut self) {
        if let MappedBy::Ipc { ctx } = &self.how {
            if ctx.bind_to_thread().is_ok() {
                // SAFETY: `at` came from cuIpcOpenMemHandle in this context; closed once.
                let _ = unsafe { sys::cuIpcCloseMemHandle(self.at) };
            }
        }
    }
}

/// This rank's half of a connected pair: its own region and counters, the peer's region.
pub struct PeerLink {
    region: PeerRegion,
    own: DeviceAlloc,
    epochs: DeviceAlloc,
    peer: PeerMapping,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink")
            .field("cap", &self.region.cap)
            .finish()
    }
}

impl PeerLink {
    /// Whether a sum of `n` f32 fits one call.
    pub fn fits(&self, n: usize) -> bool {
        n <= self.region.cap
    }

    /// The kernel's arguments for `out = input + the peer's input` over `n` f32.
    pub fn all_reduce(&self, input: CUdeviceptr, out: CUdeviceptr, n: usize) -> PeerAllReduce {
        PeerAllReduce {
            input,
            out,
            n,
            region: self.region,
            peer_base: self.peer.at,
            own_base: self.own.at,
            epochs: self.epochs.at,
        }
    }

    pub fn memory(&self) -> PeerMemory {
        match self.peer.how {
            MappedBy::SameProcess { .. } => PeerMemory::SameProcess,
            MappedBy::Ipc { .. } => PeerMemory::CudaIpc,
        }
    }

    /// Connects the two ranks of `comm` (collective: both must call it, in the same place of
    /// their order of collectives): the link, or why the pair keeps NCCL. `wanted` false still
    /// takes part, offering nothing. A group of other than two ranks exchanges nothing.
    pub fn connect(
        comm: &dyn Communicator,
        ctx: &Arc<CudaContext>,
        wanted: bool,
    ) -> Result<Result<Self, String>, CommError> {
        if comm.world_size() != 2 {
            let why = format!("{} ranks; the peer all-reduce pairs two", comm.world_size());
            return Ok(Err(why));
        }
        let region = PeerRegion { cap: PEER_CAP };
        let mut local_refusal = (!wanted).then(|| "off on this rank".to_string());
        let mut allocs = None;
        if wanted {
            match Self::allocate(ctx, region) {
                Ok(a) => allocs = Some(a),
                Err(e) => local_refusal = Some(e),
            }
        }
        let ipc = allocs
            .as_ref()
            .and_then(|(own, _)| ipc_handle(ctx, own.at).ok());
        let mine = PeerRecord {
            offered: allocs.is_some(),
            process: process_token(),
            ordinal: u32::try_from(ctx.ordinal()).unwrap_or(u32::MAX),
            region: allocs.as_ref().map_or(0, |(own, _)| own.at),
            cap: region.cap as u64,
            ipc,
            boot_id: boot_id(),
        };
        let theirs = exchange(comm, &mine)?;
        let mapped = match route(&mine, &theirs) {
            Route::Refuse(why) => Err(local_refusal.unwrap_or(why)),
            route => map_peer(ctx, route),
        };
        // Both or neither: one rank in the peer kernel would wait forever for the other.
        let mut ok = [if mapped.is_ok() { 1.0f32 } else { 0.0 }];
        comm.all_reduce_sum(&mut ok)?;
        Ok(match (mapped, allocs) {
            (Ok(peer), Some((own, epochs))) if ok[0] == 2.0 => Ok(Self {
                region,
                own,
                epochs,
                peer,
            }),
            // Dropping the mapping closes an IPC handle.
            (Ok(_), _) => Err("the peer rank could not map this rank's memory".into()),
            (Err(why), _) => Err(why),
        })
    }

    fn allocate(
        ctx: &Arc<CudaContext>,
        region: PeerRegion,
    ) -> Result<(DeviceAlloc, DeviceAlloc), String> {
        Ok((
            DeviceAlloc::zeroed(ctx, region.bytes())?,
            DeviceAlloc::zeroed(ctx, PEER_EPOCH_BYTES)?,
        ))
    }
}

fn ipc_handle(ctx: &Arc<CudaContext>, at: CUdeviceptr) -> Result<[u8; 64], String> {
    ctx.bind_to_thread()
        .map_err(|e| format!("bind context: {e:?}"))?;
    let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::zeroed();
    // SAFETY: `at` is the base of a cuMemAlloc allocation of this context; the handle is
    // written by a successful call and read only then.
    let handle = unsafe {
        cuda(
            "cuIpcGetMemHandle",
            sys::cuIpcGetMemHandle(handle.as_mut_ptr(), at),
        )?;
        handle.assume_init()
    };
    let mut bytes = [0u8; 64];
    for (b, c) in bytes.iter_mut().zip(handle.reserved.iter()) {
        *b = *c as u8;
    }
    Ok(bytes)
}

/// Each rank's record, rank 0's first (both ranks call this).
fn exchange(comm: &dyn Communicator, mine: &PeerRecord) -> Result<PeerRecord, CommError> {
    let rank = comm.rank();
    let mut records = Vec::with_capacity(2);
    for root in 0..2 {
        let mut bytes = if root == rank {
            mine.encode()
        } else {
            Vec::new()
        };
        comm.broadcast_bytes(root, &mut bytes)?;
        records.push(PeerRecord::decode(&bytes).map_err(CommError::Failed)?);
    }
    Ok(records.swap_remove(1 - rank))
}

/// How this rank can reach the peer's region, decided from the two records alone.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// The same process: the peer's pointer, once peer access to its GPU is on.
    SameProcess {
        ordinal: usize,
        region: CUdeviceptr,
    },
    /// Another process on this host: open the peer's IPC handle.
    Ipc([u8; 64]),
    Refuse(String),
}

fn route(mine: &PeerRecord, theirs: &PeerRecord) -> Route {
    if !mine.offered {
        return Route::Refuse("this rank offers no peer memory".into());
    }
    if !theirs.offered {
        return Route::Refuse("the peer rank offers no peer memory".into());
    }
    if theirs.cap != mine.cap {
        return Route::Refuse(format!(
            "the peer's buffer holds {} values, this rank's {}",
            theirs.cap, mine.cap
        ));
    }
    if theirs.process == mine.process {
        return match usize::try_from(theirs.ordinal) {
            Ok(ordinal) => Route::SameProcess {
                ordinal,
                region: theirs.region,
            },
            Err(e) => Route::Refuse(format!("peer GPU ordinal: {e}")),
        };
    }
    // Containers share the host kernel's boot id; pids and hostnames they do not.
    if mine.boot_id.is_empty() || mine.boot_id != theirs.boot_id {
        return Route::Refuse("the ranks run on different hosts".into());
    }
    match theirs.ipc {
        Some(handle) => Route::Ipc(handle),
        None => Route::Refuse("the peer rank has no CUDA IPC handle".into()),
    }
}

/// The peer's region in this context, along `route` (not `Refuse`).
fn map_peer(ctx: &Arc<CudaContext>, route: Route) -> Result<PeerMapping, String> {
    ctx.bind_to_thread()
        .map_err(|e| format!("bind context: {e:?}"))?;
    let handle = match route {
        Route::Refuse(why) => return Err(why),
        Route::SameProcess { ordinal, region } => {
            let peer = CudaContext::new(ordinal).map_err(|e| format!("peer GPU: {e:?}"))?;
            let mut can = 0;
            // SAFETY: both devices are valid ordinals of this process; `can` is written.
            unsafe {
                cuda(
                    "cuDeviceCanAccessPeer",
                    sys::cuDeviceCanAccessPeer(&mut can, ctx.cu_device(), peer.cu_device()),
                )?;
            }
            if can == 0 {
                return Err(format!(
                    "GPU {} cannot access GPU {ordinal} directly",
                    ctx.ordinal()
                ));
            }
            // Opening the peer's context may have made it current.
            ctx.bind_to_thread()
                .map_err(|e| format!("bind context: {e:?}"))?;
            // SAFETY: enables this (current) context's access to the peer's; NCCL may have done
            // so already, which the driver reports and which is fine.
            match unsafe { sys::cuCtxEnablePeerAccess(peer.cu_ctx(), 0) } {
                CUresult::CUDA_SUCCESS | CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
                e => return Err(format!("cuCtxEnablePeerAccess: {e:?}")),
            }
            return Ok(PeerMapping {
                at: region,
                how: MappedBy::SameProcess { _peer: peer },
            });
        }
        Route::Ipc(handle) => handle,
    };
    let mut raw = sys::CUipcMemHandle { reserved: [0; 64] };
    for (r, b) in raw.reserved.iter_mut().zip(handle) {
        *r = b as _;
    }
    let mut at = 0;
    // SAFETY: the handle names the peer's live allocation (it stays allocated until the pair
    // stops); `at` is written by a successful open.
    unsafe {
        cuda(
            "cuIpcOpenMemHandle",
            sys::cuIpcOpenMemHandle_v2(
                &mut at,
                raw,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            ),
        )?;
    }
    Ok(PeerMapping {
        at,
        how: MappedBy::Ipc { ctx: ctx.clone() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = PeerRecord {
            offered: true,
            process: 0x0123_4567_89ab_cdef,
            ordinal: 1,
            region: 0x7f00_0000_0000,
            cap: PEER_CAP as u64,
            ipc: Some([7; 64]),
            boot_id: "9d1f0b4e-0000-4000-8000-000000000001".into(),
        };
        assert_eq!(PeerRecord::decode(&r.encode()).unwrap(), r);
        let none = PeerRecord {
            offered: false,
            ipc: None,
            boot_id: String::new(),
            ..r
        };
        assert_eq!(PeerRecord::decode(&none.encode()).unwrap(), none);
        assert!(PeerRecord::decode(&[9, 1, 2]).is_err());
        let mut wrong = r.encode();
        wrong[0] = 2;
        assert!(PeerRecord::decode(&wrong).is_err());
    }

    fn record(process: u64, boot_id: &str) -> PeerRecord {
        PeerRecord {
            offered: true,
            process,
            ordinal: 0,
            region: 0x7f00_0000_0000,
            cap: PEER_CAP as u64,
            ipc: Some([3; 64]),
            boot_id: boot_id.into(),
        }
    }

    #[test]
    fn routes_follow_process_and_host() {
        let here = record(1, "boot-a");
        let thread = PeerRecord {
            ordinal: 1,
            region: 0x7f10_0000_0000,
            ..record(1, "boot-a")
        };
        assert_eq!(
            route(&here, &thread),
            Route::SameProcess {
                ordinal: 1,
                region: 0x7f10_0000_0000
            }
        );
        assert_eq!(route(&here, &record(2, "boot-a")), Route::Ipc([3; 64]));
        let refused = |theirs: &PeerRecord, mine: &PeerRecord, says: &str| match route(mine, theirs)
        {
            Route::Refuse(why) => assert!(why.contains(says), "{why}"),
            other => panic!("expected a refusal ({says}), got {other:?}"),
        };
        refused(&record(2, "boot-b"), &here, "different hosts");
        refused(&record(2, ""), &record(1, ""), "different hosts");
        let no_handle = PeerRecord {
            ipc: None,
            ..record(2, "boot-a")
        };
        refused(&no_handle, &here, "no CUDA IPC handle");
        let smaller = PeerRecord {
            cap: 4096,
            ..record(2, "boot-a")
        };
        refused(&smaller, &here, "buffer holds 4096");
        let declined = PeerRecord {
            offered: false,
            ..record(2, "boot-a")
        };
        refused(&declined, &here, "peer rank offers no");
        refused(&record(2, "boot-a"), &declined, "this rank offers no");
    }

    #[test]
    fn each_rank_receives_the_others_record() {
        let group = crate::ranks::local::group(2);
        let got: Vec<PeerRecord> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .enumerate()
                .map(|(rank, comm)| {
                    s.spawn(move || exchange(comm, &record(rank as u64 + 10, "boot")).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got[0], record(11, "boot"));
        assert_eq!(got[1], record(10, "boot"));
    }

    #[test]
    fn the_peer_path_is_opt_in() {
        assert!(!opted_in(None));
        assert!(!opted_in(Some("0")));
        assert!(!opted_in(Some("")));
        assert!(opted_in(Some("1")));
        assert!(opted_in(Some(" true ")));
    }

    #[test]
    fn the_process_token_is_stable_within_a_process() {
        assert_eq!(process_token(), process_token());
    }
}
