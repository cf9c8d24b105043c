use std::path::PathBuf;

use cudarc::driver::DriverError;

/// Everything that can go wrong between finding the GPU and launching a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("no CUDA driver library (libcuda.so) found: --device cuda needs an NVIDIA driver")]
    NoDriver,
    #[error("no NVRTC library (libnvrtc.so) found and no prebuilt cubin for {name} ({arch}); install the CUDA runtime libraries or set DSPARK_KERNEL_PREBUILT")]
    NoNvrtc { name: &'static str, arch: String },
    #[error("GPU compute capability {major}.{minor} is not supported (the kernels need sm_89 or newer for the FP8 converter)")]
    UnsupportedArch { major: i32, minor: i32 },
    #[error("CUDA driver call failed ({what}): {source}")]
    Driver {
        what: &'static str,
        #[source]
        source: DriverError,
    },
    #[error("NVRTC could not compile {name} for {arch}: {message}\n{log}")]
    Compile {
        name: &'static str,
        arch: String,
        message: String,
        log: String,
    },
    #[error("kernel cache I/O at {path}: {source}")]
    CacheIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid launch of {kernel}: {reason}")]
    InvalidLaunch {
        kernel: &'static str,
        reason: String,
    },
}

impl KernelError {
    pub(crate) fn driver(what: &'static str) -> impl FnOnce(DriverError) -> Self {
        move |source| Self::Driver { what, source }
    }

    pub(crate) fn invalid(kernel: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidLaunch {
            kernel,
            reason: reason.into(),
        }
    }
}
