//! Launches of `collective.cu`: the two-rank all-reduce over peer memory. The memory itself (a
//! region on each GPU that the other maps) is the caller's; [`PeerRegion`] fixes its layout so
//! the kernel and the code that allocates and exchanges it agree.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig};

use super::submit::SubmitKernel;
use super::{function, i64_arg, nonnull, Kernels};
use crate::error::KernelError;

/// Blocks of every peer all-reduce (DSK_PEER_BLOCKS in collective.cu).
pub const PEER_BLOCKS: usize = 32;
const PEER_THREADS: u32 = 256;

/// The `collective.cu` kernels.
pub struct CollectiveFns {
    all_reduce2: CudaFunction,
    /// 1: a system-scope fence before each flag's release store (the conservative form, the
    /// default); 0 (`DSPARK_PEER_FENCE=0`): the release store alone.
    system_fence: i32,
}

impl CollectiveFns {
    pub(crate) fn load(module: &Arc<CudaModule>) -> Result<Self, KernelError> {
        Ok(Self {
            all_reduce2: function(module, "dsk_peer_all_reduce2_f32")?,
            system_fence: system_fence(std::env::var("DSPARK_PEER_FENCE").ok().as_deref()),
        })
    }
}

/// DSPARK_PEER_FENCE: unset or anything but "0" keeps the fence.
fn system_fence(value: Option<&str>) -> i32 {
    i32::from(value.map(str::trim) != Some("0"))
}

/// Layout of the region each rank allocates for its peer to write into: two rows of
/// [`PEER_BLOCKS`] u32 flags, then two receive halves of `cap` f32 (256-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRegion {
    /// f32 values one call may carry.
    pub cap: usize,
}

impl PeerRegion {
    /// Bytes of the flag rows, rounded to 256 so the halves start aligned.
    pub const FLAG_BYTES: usize = 256;

    /// Bytes to allocate (zeroed before the peer first writes).
    pub fn bytes(&self) -> usize {
        Self::FLAG_BYTES + 2 * self.cap * 4
    }

    /// The flags of a region that starts at `base`.
    pub fn flags(&self, base: CUdeviceptr) -> CUdeviceptr {
        base
    }

    /// The first receive half of a region that starts at `base`.
    pub fn recv(&self, base: CUdeviceptr) -> CUdeviceptr {
        base + Self::FLAG_BYTES as u64
    }
}

/// Bytes of the per-rank call counters ([`PEER_BLOCKS`] u32, zeroed before the first call).
pub const PEER_EPOCH_BYTES: usize = PEER_BLOCKS * 4;

// The flag rows must fit the space the layout gives them.
const _: () = assert!(2 * PEER_BLOCKS * 4 <= PeerRegion::FLAG_BYTES);

/// One two-rank all-reduce: `out = in + the peer's in` over `n` f32.
#[derive(Clone, Copy, Debug)]
pub struct PeerAllReduce {
    pub input: CUdeviceptr,
    /// May equal `input` (in place).
    pub out: CUdeviceptr,
    pub n: usize,
    pub region: PeerRegion,
    /// The peer's region, as mapped on this GPU.
    pub peer_base: CUdeviceptr,
    /// This rank's region (the peer writes into it).
    pub own_base: CUdeviceptr,
    /// This rank's call counters.
    pub epochs: CUdeviceptr,
}

/// Launch-time checks of [`Kernels::peer_all_reduce2`], testable without a GPU.
pub fn check_peer_all_reduce(a: &PeerAllReduce) -> Result<(), KernelError> {
    const K: &str = "peer_all_reduce2";
    nonnull(
        K,
        &[
            ("input", a.input),
            ("out", a.out),
            ("peer region", a.peer_base),
            ("own region", a.own_base),
            ("epochs", a.epochs),
        ],
    )?;
    if a.n > a.region.cap {
        return Err(KernelError::invalid(
            K,
            format!("{} values exceed the peer buffer's {}", a.n, a.region.cap),
        ));
    }
    if !a.region.cap.is_multiple_of(4) {
        return Err(KernelError::invalid(
            K,
            format!("capacity {} must be a multiple of 4", a.region.cap),
        ));
    }
    Ok(())
}

/// The kernel's (vec4, aligned): whether its blocks take the values four at a time, which must
/// depend on what both ranks share (n; the regions' halves are 16-byte aligned, checked here)
/// and never on one rank's buffers, or a block would read values its peer block never pushed;
/// and whether this rank's `input` / `out` can move as float4 (16-byte aligned).
fn index_map(a: &PeerAllReduce) -> (bool, bool) {
    let vec4 = a.n.is_multiple_of(4)
        && [a.peer_base, a.own_base]
            .iter()
            .all(|p| p.is_multiple_of(16));
    let aligned = [a.input, a.out].iter().all(|p| p.is_multiple_of(16));
    (vec4, vec4 && aligned)
}

impl Kernels {
    /// [`PeerAllReduce`] on `stream`. Both ranks must make the same calls in the same order with
    /// the same `n` (as with NCCL); each call waits on the GPU for the peer's.
    ///
    /// # Safety
    /// `input` / `out` must address `n` f32 of this context; the regions and counters must be
    /// laid out as [`PeerRegion`] and [`PEER_EPOCH_BYTES`] say, zeroed before the first call on
    /// either rank, the peer's mapped into this context, all alive until the stream has run
    /// the call; only this pair's calls may use them, on one stream per rank.
    pub unsafe fn peer_all_reduce2(
        &self,
        stream: &CudaStream,
        a: &PeerAllReduce,
    ) -> Result<(), KernelError> {
        const K: &str = "peer_all_reduce2";
        check_peer_all_reduce(a)?;
        let n = i64_arg(K, "n", a.n)?;
        let cap = i64_arg(K, "cap", a.region.cap)?;
        let (vec4, aligned) = index_map(a);
        let (vec4, aligned) = (i32::from(vec4), i32::from(aligned));
        let (peer_recv, peer_flags) = (a.region.recv(a.peer_base), a.region.flags(a.peer_base));
        let (own_recv, own_flags) = (a.region.recv(a.own_base), a.region.flags(a.own_base));
        let cfg = LaunchConfig {
            grid_dim: (PEER_BLOCKS as u32, 1, 1),
            block_dim: (PEER_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.collective.all_reduce2)
            .arg(&a.input)
            .arg(&a.out)
            .arg(&n)
            .arg(&vec4)
            .arg(&aligned)
            .arg(&peer_recv)
            .arg(&peer_flags)
            .arg(&own_recv)
            .arg(&own_flags)
            .arg(&a.epochs)
            .arg(&cap)
            .arg(&self.collective.system_fence)
            .launch(cfg)
            .map_err(KernelError::driver("launch peer_all_reduce2"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(n: usize, cap: usize) -> PeerAllReduce {
        PeerAllReduce {
            input: 0x1000,
            out: 0x1000,
            n,
            region: PeerRegion { cap },
            peer_base: 0x10_0000,
            own_base: 0x20_0000,
            epochs: 0x3000,
        }
    }

    #[test]
    fn checks_size_and_pointers() {
        assert!(check_peer_all_reduce(&call(4096, 4096)).is_ok());
        let e = check_peer_all_reduce(&call(4097, 4096)).unwrap_err();
        assert!(e.to_string().contains("exceed"), "{e}");
        let mut null = call(16, 4096);
        null.epochs = 0;
        assert!(check_peer_all_reduce(&null)
            .unwrap_err()
            .to_string()
            .contains("epochs"));
        assert!(check_peer_all_reduce(&call(16, 4094)).is_err());
    }

    #[test]
    fn the_index_map_follows_n_alone_and_alignment_only_the_access() {
        assert_eq!(index_map(&call(4096, 4096)), (true, true));
        assert_eq!(index_map(&call(4095, 4096)), (false, false));
        // One rank's input off 16 bytes: the same map as its peer's, scalar accesses.
        let mut odd = call(4096, 4096);
        odd.input += 4;
        assert_eq!(index_map(&odd), (true, false));
        let mut odd_out = call(4096, 4096);
        odd_out.out += 8;
        assert_eq!(index_map(&odd_out), (true, false));
    }

    #[test]
    fn the_fence_stays_unless_turned_off() {
        assert_eq!(system_fence(None), 1);
        assert_eq!(system_fence(Some("1")), 1);
        assert_eq!(system_fence(Some(" 0 ")), 0);
    }

    #[test]
    fn halves_start_aligned_after_the_flags() {
        let r = PeerRegion { cap: 1 << 20 };
        assert_eq!(r.recv(0x1000_0000) % 256, 0);
        assert_eq!(r.bytes(), 256 + 8 * (1 << 20));
    }
}
