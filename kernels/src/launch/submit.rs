//! How every kernel of this crate is submitted: `cuLaunchKernelEx`, with programmatic dependent
//! launch (PDL) on Hopper and later. A decode step is thousands of small dependent kernels; with
//! PDL a kernel's blocks are scheduled while its predecessor drains, instead of after it, and each
//! kernel's first act (`dsk_pdl_entry` in common.cuh) is `griddepcontrol.wait`, which returns once
//! the predecessor has finished and its writes are visible: the stream order the kernels rely on
//! is unchanged. Kernels then call `griddepcontrol.launch_dependents` at once, so the successor's
//! launch overlaps their whole run. Works inside CUDA-graph capture (programmatic edges).
//!
//! On by default since session 27 (`DSPARK_PDL=0` turns it off; then the attribute is not set and
//! the kernels' wait is a no-op). The GEMV and skinny GEMM kernels issue their first weight loads
//! before the wait (weights are never written once the model is loaded), so those loads overlap
//! the previous kernel's tail: at the shapes of one TP=2 rank on an H200 a decode step took 4-7%
//! less time at batch 1 and 1-6% at batch 16 (docs/PERFORMANCE.md). Before, with the wait first
//! in every kernel, it had measured slower or mixed (sessions 7 and 19).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaFunction, CudaStream, DriverError, LaunchConfig};

/// Whether launches carry the PDL attribute: set by `Kernels::load` (sm_90+ and not disabled).
static PDL: AtomicBool = AtomicBool::new(false);

/// Turns PDL on for devices that have it (compute capability 9.0+) unless `DSPARK_PDL=0`.
pub(crate) fn enable_pdl(major: i32) {
    let allowed = pdl_allowed(std::env::var("DSPARK_PDL").ok().as_deref());
    PDL.store(allowed && major >= 9, Ordering::Relaxed);
}

/// DSPARK_PDL: unset or anything but "0" allows PDL.
fn pdl_allowed(value: Option<&str>) -> bool {
    value.map(str::trim) != Some("0")
}

/// Whether kernels are being submitted with programmatic dependent launch.
pub fn pdl_enabled() -> bool {
    PDL.load(Ordering::Relaxed)
}

/// Streams whose kernels launch at the device's greatest priority (the launch attribute, which a
/// graph capture keeps on the kernel node): the layer stack's side streams, one per backend.
/// Their kernels are short and feed the main stream's next wait, but a wide kernel launched early
/// under PDL holds every free block slot, so at equal priority a side kernel waited for all its
/// pending blocks to be placed before it got an SM. Raw stream handles (0 = free slot), read by
/// every launch without a lock; ranks of one process launch concurrently.
static HIGH_PRIORITY_STREAMS: [AtomicUsize; 8] = [const { AtomicUsize::new(0) }; 8];
/// The device's greatest (numerically least) stream priority, read at each registration.
static GREATEST_PRIORITY: AtomicI32 = AtomicI32::new(0);

/// DSPARK_SIDE_PRIORITY: unset or anything but "0" raises the side stream's priority.
pub fn side_priority_allowed(value: Option<&str>) -> bool {
    value.map(str::trim) != Some("0")
}

/// Launches on `stream` from now on carry the greatest priority the device has. Graphs captured
/// from it keep that priority on their nodes; they honour it when instantiated with
/// `CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY` ([`graph_instantiate_flags`]). Where every slot
/// is taken the stream keeps the default priority (a slower step, the same results).
pub fn set_high_priority(stream: &CudaStream) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    let (mut least, mut greatest) = (0i32, 0i32);
    // SAFETY: two valid out-pointers; the context is current.
    unsafe { sys::cuCtxGetStreamPriorityRange(&mut least, &mut greatest) }.result()?;
    GREATEST_PRIORITY.store(greatest, Ordering::Relaxed);
    let handle = stream.cu_stream() as usize;
    if handle == 0
        || HIGH_PRIORITY_STREAMS
            .iter()
            .any(|s| s.load(Ordering::Relaxed) == handle)
    {
        return Ok(());
    }
    let claimed = HIGH_PRIORITY_STREAMS.iter().any(|s| {
        s.compare_exchange(0, handle, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    });
    if !claimed {
        tracing::warn!("no free slot for another high-priority stream; it keeps the default");
    }
    Ok(())
}

/// Launches on `stream` go back to the default priority: called before the stream is destroyed,
/// so that a stream created later at the same handle does not inherit the raise.
pub fn clear_high_priority(stream: &CudaStream) {
    let handle = stream.cu_stream() as usize;
    for s in &HIGH_PRIORITY_STREAMS {
        let _ = s.compare_exchange(handle, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// The priority launches on `stream` carry, where one was set ([`set_high_priority`]).
fn launch_priority(stream: &CudaStream) -> Option<i32> {
    let handle = stream.cu_stream() as usize;
    // 0 is the legacy default stream, and also a free slot's value.
    if handle == 0 {
        return None;
    }
    HIGH_PRIORITY_STREAMS
        .iter()
        .any(|s| s.load(Ordering::Relaxed) == handle)
        .then(|| GREATEST_PRIORITY.load(Ordering::Relaxed))
}

/// Instantiation flags for a captured graph: its nodes' priorities honoured (they are all the
/// default unless a stream was raised with [`set_high_priority`]).
pub fn graph_instantiate_flags() -> sys::CUgraphInstantiate_flags {
    sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY
}

/// A value a kernel takes by value: the launch passes a pointer to it.
pub(crate) trait KernelArg {}
impl KernelArg for i32 {}
impl KernelArg for u32 {}
impl KernelArg for i64 {}
impl KernelArg for f32 {}
// CUdeviceptr is u64.
impl KernelArg for CUdeviceptr {}

/// One kernel submission being built: `stream.kernel(&f).arg(&a).arg(&b).launch(cfg)`.
pub(crate) struct KernelLaunch<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    args: Vec<*mut c_void>,
}

pub(crate) trait SubmitKernel {
    fn kernel<'a>(&'a self, func: &'a CudaFunction) -> KernelLaunch<'a>;
}

impl SubmitKernel for CudaStream {
    fn kernel<'a>(&'a self, func: &'a CudaFunction) -> KernelLaunch<'a> {
        KernelLaunch {
            stream: self,
            func,
            args: Vec::with_capacity(16),
        }
    }
}

impl<'a> KernelLaunch<'a> {
    /// Appends the next parameter. The reference must outlive the launch (it does: the builder
    /// borrows it for `'a`).
    pub(crate) fn arg<T: KernelArg>(&mut self, v: &'a T) -> &mut Self {
        self.args.push(v as *const T as *mut c_void);
        self
    }

    /// Submits the kernel.
    ///
    /// # Safety
    /// The parameters must be exactly the kernel's, in order and type, and every pointer among
    /// them valid for what the kernel does with it.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        // SAFETY: the caller's promise, passed on; one block per cluster is a plain launch.
        unsafe { self.launch_clusters(cfg, 1) }
    }

    /// Submits the kernel with blocks grouped into clusters of `cluster_x` consecutive x indices
    /// (sm_90+; `grid_dim.0` a multiple of it). 1 sets no cluster attribute.
    ///
    /// # Safety
    /// As [`Self::launch`].
    pub(crate) unsafe fn launch_clusters(
        &mut self,
        cfg: LaunchConfig,
        cluster_x: u32,
    ) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        // SAFETY: an all-zero attribute is a valid (ignored) value of the C union; set below.
        let mut attrs: [sys::CUlaunchAttribute; 3] = unsafe { std::mem::zeroed() };
        let mut n_attrs = 0;
        if pdl_enabled() {
            attrs[n_attrs].id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[n_attrs].value.programmaticStreamSerializationAllowed = 1;
            n_attrs += 1;
        }
        if let Some(priority) = launch_priority(self.stream) {
            attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PRIORITY;
            attrs[n_attrs].value.priority = priority;
            n_attrs += 1;
        }
        if cluster_x > 1 {
            attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attrs[n_attrs].value.clusterDim.x = cluster_x;
            attrs[n_attrs].value.clusterDim.y = 1;
            attrs[n_attrs].value.clusterDim.z = 1;
            n_attrs += 1;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if n_attrs > 0 {
                attrs.as_mut_ptr()
            } else {
                std::ptr::null_mut()
            },
            numAttrs: n_attrs as u32,
        };
        // SAFETY: the config, function and stream are live; the parameter pointers point at
        // values borrowed for 'a (the caller vouches for their types); no `extra`.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                self.args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{pdl_allowed, side_priority_allowed};

    #[test]
    fn side_priority_is_on_unless_turned_off() {
        assert!(side_priority_allowed(None));
        assert!(side_priority_allowed(Some("1")));
        assert!(!side_priority_allowed(Some(" 0")));
    }

    #[test]
    fn pdl_is_on_unless_turned_off() {
        assert!(pdl_allowed(None));
        assert!(pdl_allowed(Some("1")));
        assert!(!pdl_allowed(Some("0")));
        assert!(!pdl_allowed(Some(" 0 ")));
    }
}
