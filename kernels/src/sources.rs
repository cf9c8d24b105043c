//! The CUDA sources, embedded in the binary so a deployed server needs no source tree.

use sha2::{Digest, Sha256};

/// Device helpers prepended to every source (nvcc builds use `-include common.cuh`).
pub const COMMON: &str = include_str!("../common.cuh");

/// One compilation unit: `kernels/<name>.cu`.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub body: &'static str,
}

pub const FP8_GEMV: KernelSource = KernelSource {
    name: "fp8_gemv",
    body: include_str!("../fp8_gemv.cu"),
};
pub const FP4_MOE: KernelSource = KernelSource {
    name: "fp4_moe",
    body: include_str!("../fp4_moe.cu"),
};
pub const RMSNORM: KernelSource = KernelSource {
    name: "rmsnorm",
    body: include_str!("../rmsnorm.cu"),
};
pub const ROPE: KernelSource = KernelSource {
    name: "rope",
    body: include_str!("../rope.cu"),
};
pub const SAMPLING: KernelSource = KernelSource {
    name: "sampling",
    body: include_str!("../sampling.cu"),
};
pub const TIMING: KernelSource = KernelSource {
    name: "timing",
    body: include_str!("../timing.cu"),
};

pub const ATTENTION: KernelSource = KernelSource {
    name: "attention",
    body: include_str!("../attention.cu"),
};

pub const ELEMENTWISE: KernelSource = KernelSource {
    name: "elementwise",
    body: include_str!("../elementwise.cu"),
};

pub const PAGED: KernelSource = KernelSource {
    name: "paged",
    body: include_str!("../paged.cu"),
};

pub const LAYER_OPS: KernelSource = KernelSource {
    name: "layer_ops",
    body: include_str!("../layer_ops.cu"),
};

pub const DENSE_GEMV: KernelSource = KernelSource {
    name: "dense_gemv",
    body: include_str!("../dense_gemv.cu"),
};

pub const MOE_SORTED: KernelSource = KernelSource {
    name: "moe_sorted",
    body: include_str!("../moe_sorted.cu"),
};

pub const SKINNY_MMA: KernelSource = KernelSource {
    name: "skinny_mma",
    body: include_str!("../skinny_mma.cu"),
};

pub const COLLECTIVE: KernelSource = KernelSource {
    name: "collective",
    body: include_str!("../collective.cu"),
};

pub const ALL: [KernelSource; 14] = [
    FP8_GEMV,
    FP4_MOE,
    RMSNORM,
    ROPE,
    SAMPLING,
    TIMING,
    ATTENTION,
    ELEMENTWISE,
    PAGED,
    LAYER_OPS,
    DENSE_GEMV,
    MOE_SORTED,
    SKINNY_MMA,
    COLLECTIVE,
];

impl KernelSource {
    /// The text NVRTC compiles: the common helpers, then the kernel file.
    pub fn full_text(&self) -> String {
        let mut s = String::with_capacity(COMMON.len() + self.body.len() + 1);
        s.push_str(COMMON);
        if !COMMON.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(self.body);
        s
    }

    /// First 16 hex digits of sha256(common.cuh ++ <name>.cu): the same value kernels/build.sh
    /// puts in prebuilt file names (`cat common.cuh name.cu | sha256sum`).
    pub fn source_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(COMMON.as_bytes());
        h.update(self.body.as_bytes());
        hex16(&h.finalize())
    }
}

pub(crate) fn hex16(digest: &[u8]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_defines_its_kernels_without_headers() {
        for src in ALL {
            assert!(
                src.body.contains("__global__"),
                "{} has no kernel",
                src.name
            );
            assert!(
                !src.body.contains("#include"),
                "{} must not include headers",
                src.name
            );
        }
    }

    #[test]
    fn source_hash_matches_shell_sha256() {
        // `printf 'ab' | sha256sum` = fb8e20fc2e4c3f24...: the hash is over the raw concatenation.
        let mut h = Sha256::new();
        h.update(b"a");
        h.update(b"b");
        assert_eq!(hex16(&h.finalize()), "fb8e20fc2e4c3f24");
        assert_eq!(FP8_GEMV.source_hash().len(), 16);
        assert_ne!(FP8_GEMV.source_hash(), FP4_MOE.source_hash());
    }
}
