//! Turning the embedded sources into loaded CUDA modules.
//!
//! Order per source, first hit wins:
//! 1. a prebuilt cubin `<prebuilt>/<name>.<arch>.<srchash>.cubin` (kernels/build.sh, run by the
//!    Docker image build), then an arch-neutral `<prebuilt>/<name>.<srchash>.ptx`;
//! 2. the on-disk cache `<cache>/<name>.<arch>.<key>.cubin`, key = sha256(source, arch, NVRTC
//!    options, NVRTC version);
//! 3. NVRTC, compiling straight to a cubin for the device's arch; the result is written to the
//!    cache (temp file + rename, so concurrent ranks never read a half-written file).
//!
//! The source hash in prebuilt names means a cubin built from other sources is never loaded.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys, Ptx};
use sha2::{Digest, Sha256};

use crate::error::KernelError;
use crate::sources::{hex16, KernelSource};

/// Where modules come from. `from_env` reads DSPARK_KERNEL_CACHE (empty = no cache; default
/// ~/.cache/dspark/kernels) and DSPARK_KERNEL_PREBUILT (unset = none).
#[derive(Clone, Debug, Default)]
pub struct LoaderConfig {
    pub cache_dir: Option<PathBuf>,
    pub prebuilt_dir: Option<PathBuf>,
}

impl LoaderConfig {
    pub fn from_env() -> Self {
        let cache_dir = match std::env::var_os("DSPARK_KERNEL_CACHE") {
            Some(v) if v.is_empty() => None,
            Some(v) => Some(PathBuf::from(v)),
            None => std::env::var_os("HOME").map(|h| {
                PathBuf::from(h)
                    .join(".cache")
                    .join("dspark")
                    .join("kernels")
            }),
        };
        let prebuilt_dir = std::env::var_os("DSPARK_KERNEL_PREBUILT")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        Self {
            cache_dir,
            prebuilt_dir,
        }
    }
}

/// How a module was obtained (logged at start-up, printed by kernel-check).
#[derive(Clone, Debug, PartialEq)]
pub enum ModuleOrigin {
    Prebuilt(PathBuf),
    Cache(PathBuf),
    Compiled {
        millis: u128,
        cached_to: Option<PathBuf>,
    },
}

/// NVRTC/nvcc target for a compute capability. Hopper gets the arch-specific sm_90a (wgmma,
/// setmaxnreg); GB10 (12.1) sm_121. Older than sm_89 lacks the e4m3 converter the FP8 kernels use.
pub fn target_arch(major: i32, minor: i32) -> Result<String, KernelError> {
    match (major, minor) {
        (9, 0) => Ok("sm_90a".into()),
        (10, 0) => Ok("sm_100a".into()),
        (ma, mi) if (ma, mi) >= (8, 9) => Ok(format!("sm_{ma}{mi}")),
        (ma, mi) => Err(KernelError::UnsupportedArch {
            major: ma,
            minor: mi,
        }),
    }
}

/// NVRTC options (part of the cache key).
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()]
}

/// Whether libnvrtc can be loaded (cudarc loads it lazily and panics if absent).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { nvrtc_sys::is_culib_present() }
}

fn nvrtc_version() -> (i32, i32) {
    let (mut ma, mut mi) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints; callers checked that libnvrtc is present.
    let rc = unsafe { nvrtc_sys::nvrtcVersion(&mut ma, &mut mi) };
    if rc == nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        (ma, mi)
    } else {
        (0, 0)
    }
}

/// Cache key: sha256 over everything that changes the cubin.
pub fn cache_key(src: &KernelSource, arch: &str, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(src.full_text().as_bytes());
    h.update([0]);
    h.update(arch.as_bytes());
    for o in nvrtc_options(arch) {
        h.update([0]);
        h.update(o.as_bytes());
    }
    h.update(format!("\0nvrtc {}.{}", nvrtc.0, nvrtc.1).as_bytes());
    hex16(&h.finalize())
}

/// Compiles one source with NVRTC to a cubin for `arch`. Needs libnvrtc, not a GPU.
pub fn compile_cubin(src: &KernelSource, arch: &str) -> Result<Vec<u8>, KernelError> {
    if !nvrtc_present() {
        return Err(KernelError::NoNvrtc {
            name: src.name,
            arch: arch.into(),
        });
    }
    let compile_err = |message: String, log: String| KernelError::Compile {
        name: src.name,
        arch: arch.into(),
        message,
        log,
    };
    let text =
        CString::new(src.full_text()).map_err(|e| compile_err(e.to_string(), String::new()))?;
    let file = CString::new(format!("{}.cu", src.name))
        .map_err(|e| compile_err(e.to_string(), String::new()))?;
    let prog = nvrtc_result::create_program(&text, Some(&file))
        .map_err(|e| compile_err(e.to_string(), String::new()))?;
    let opts = nvrtc_options(arch);
    // SAFETY: `prog` was just created and is destroyed exactly once below; `text`/`file` outlive it.
    let compiled = unsafe { nvrtc_result::compile_program(prog, &opts) };
    let result = match compiled {
        Err(e) => {
            // SAFETY: valid program; the log is a NUL-terminated C string.
            let log = unsafe { nvrtc_result::get_program_log(prog) }
                .map(|l| {
                    unsafe { CStr::from_ptr(l.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            Err(compile_err(e.to_string(), log))
        }
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: valid, compiled program; the buffer has the size NVRTC reported.
            let rc = unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) };
            if rc != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                Err(compile_err(
                    format!("nvrtcGetCUBINSize: {rc:?}"),
                    String::new(),
                ))
            } else {
                let mut buf = vec![0u8; size];
                // SAFETY: as above.
                let rc = unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) };
                if rc == nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
                    Ok(buf)
                } else {
                    Err(compile_err(format!("nvrtcGetCUBIN: {rc:?}"), String::new()))
                }
            }
        }
    };
    // SAFETY: destroys the program created above, once.
    if let Err(e) = unsafe { nvrtc_result::destroy_program(prog) } {
        tracing::warn!(kernel = src.name, error = %e, "nvrtcDestroyProgram failed");
    }
    result
}

fn read_if_exists(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), KernelError> {
    let io = |source| KernelError::CacheIo {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn load_image(ctx: &Arc<CudaContext>, image: Vec<u8>) -> Result<Arc<CudaModule>, KernelError> {
    ctx.load_module(Ptx::from_binary(image))
        .map_err(KernelError::driver("cuModuleLoadData"))
}

/// Loads one source into `ctx` (see the module docs for the order).
pub fn load_module(
    ctx: &Arc<CudaContext>,
    src: &KernelSource,
    arch: &str,
    cfg: &LoaderConfig,
) -> Result<(Arc<CudaModule>, ModuleOrigin), KernelError> {
    let srchash = src.source_hash();
    if let Some(dir) = &cfg.prebuilt_dir {
        let cubin = dir.join(format!("{}.{arch}.{srchash}.cubin", src.name));
        let ptx = dir.join(format!("{}.{srchash}.ptx", src.name));
        for path in [cubin, ptx] {
            if let Some(mut bytes) = read_if_exists(&path) {
                if path.extension().is_some_and(|e| e == "ptx") {
                    bytes.push(0); // the driver reads PTX as a C string
                }
                match load_image(ctx, bytes) {
                    Ok(m) => return Ok((m, ModuleOrigin::Prebuilt(path))),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "prebuilt kernel image rejected")
                    }
                }
            }
        }
    }
    let nvrtc = if nvrtc_present() {
        nvrtc_version()
    } else {
        (0, 0)
    };
    let cached = cfg.cache_dir.as_ref().map(|d| {
        d.join(format!(
            "{}.{arch}.{}.cubin",
            src.name,
            cache_key(src, arch, nvrtc)
        ))
    });
    if let Some(path) = &cached {
        if let Some(bytes) = read_if_exists(path) {
            match load_image(ctx, bytes) {
                Ok(m) => return Ok((m, ModuleOrigin::Cache(path.clone()))),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cached cubin rejected; recompiling");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
    let t0 = Instant::now();
    let cubin = compile_cubin(src, arch)?;
    let millis = t0.elapsed().as_millis();
    let mut cached_to = None;
    if let Some(path) = cached {
        match write_atomically(&path, &cubin) {
            Ok(()) => cached_to = Some(path),
            Err(e) => tracing::warn!(error = %e, "could not write the kernel cache"),
        }
    }
    tracing::info!(kernel = src.name, arch, millis, "compiled with NVRTC");
    let m = load_image(ctx, cubin)?;
    Ok((m, ModuleOrigin::Compiled { millis, cached_to }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources;

    #[test]
    fn arch_mapping() {
        assert_eq!(target_arch(9, 0).unwrap(), "sm_90a");
        assert_eq!(target_arch(12, 1).unwrap(), "sm_121");
        assert_eq!(target_arch(8, 9).unwrap(), "sm_89");
        assert!(matches!(
            target_arch(8, 0),
            Err(KernelError::UnsupportedArch { .. })
        ));
    }

    #[test]
    fn cache_key_depends_on_arch_source_and_compiler() {
        let a = cache_key(&sources::RMSNORM, "sm_90a", (13, 0));
        assert_eq!(a, cache_key(&sources::RMSNORM, "sm_90a", (13, 0)));
        assert_ne!(a, cache_key(&sources::RMSNORM, "sm_121", (13, 0)));
        assert_ne!(a, cache_key(&sources::ROPE, "sm_90a", (13, 0)));
        assert_ne!(a, cache_key(&sources::RMSNORM, "sm_90a", (13, 2)));
    }

    #[test]
    fn atomic_write_creates_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a").join("b.cubin");
        write_atomically(&p, b"xyz").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"xyz");
    }

    /// Every source compiles for both deployment targets. Needs only libnvrtc (no GPU); skipped
    /// with a message where it is absent, unless DSPARK_REQUIRE_NVRTC=1 (the CI step that
    /// installs libnvrtc from PyPI sets it, so a lost library cannot pass as a skip).
    #[test]
    fn all_sources_compile_with_nvrtc() {
        if !nvrtc_present() {
            assert!(
                std::env::var("DSPARK_REQUIRE_NVRTC").as_deref() != Ok("1"),
                "DSPARK_REQUIRE_NVRTC=1 but libnvrtc was not found (LD_LIBRARY_PATH)"
            );
            eprintln!("SKIP all_sources_compile_with_nvrtc: libnvrtc not found (set LD_LIBRARY_PATH to a CUDA lib dir to run it)");
            return;
        }
        for arch in ["sm_90a", "sm_121"] {
            for src in sources::ALL {
                let cubin = compile_cubin(&src, arch).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(
                    &cubin[..4],
                    b"\x7fELF",
                    "{} {arch}: not an ELF cubin",
                    src.name
                );
            }
        }
    }
}
