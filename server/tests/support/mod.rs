//! Test support: repository paths, the tiny model's checkpoint, transformers reference checks
//! (`reference`), a checkpoint with a tensor hidden, driving a scheduler by hand (`scheduler`),
//! and an in-process tensor-parallel group.
#![allow(dead_code)]

pub mod reference;
pub mod scheduler;

use dspark_server::engine::model::{HostTensor, LoadError, WeightSource};
use dspark_server::engine::weights::Checkpoint;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The tiny model shipped in the repo.
pub fn tiny_dir() -> PathBuf {
    repo_path("assets/tiny-dsv4")
}

/// The tiny model shipped in the repo, through the real checkpoint layer.
pub fn tiny_checkpoint() -> Checkpoint {
    Checkpoint::open(&tiny_dir()).unwrap()
}

/// Writes `dir/config.json`: the tiny model's config at a width where every packed CUDA path
/// runs (FP8 tiles of 128, FP4 groups of 32 on both TP shards), with the real formats (FP8
/// attention and shared experts, FP4 routed experts), plus `overrides`.
pub fn write_wide_config(dir: &Path, overrides: &[(&str, i64)]) {
    let tiny: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("assets/tiny-dsv4/config.json")).unwrap(),
    )
    .unwrap();
    let mut c = tiny.as_object().unwrap().clone();
    let wide = [
        ("hidden_size", 256),
        ("moe_intermediate_size", 256),
        ("q_lora_rank", 256),
        ("o_lora_rank", 128),
        ("head_dim", 128),
        ("qk_rope_head_dim", 64),
        ("num_attention_heads", 4),
        ("index_head_dim", 64),
        ("index_n_heads", 4),
        ("o_groups", 2),
    ];
    for (k, v) in wide.iter().chain(overrides) {
        c.insert((*k).into(), (*v).into());
    }
    c.insert("expert_dtype".into(), "fp4".into());
    c.insert(
        "quantization_config".into(),
        serde_json::json!({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}),
    );
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&c).unwrap(),
    )
    .unwrap();
}

/// A checkpoint that lacks one tensor, for the loaders' missing-tensor errors.
pub struct WithoutTensor<'a> {
    pub inner: &'a Checkpoint,
    pub missing: &'a str,
}

impl WeightSource for WithoutTensor<'_> {
    fn contains(&self, name: &str) -> bool {
        name != self.missing && self.inner.contains(name)
    }
    fn tensor_f32(&self, name: &str) -> Result<HostTensor, LoadError> {
        WeightSource::tensor_f32(self.inner, name)
    }
    fn tensor_f32_slice(
        &self,
        name: &str,
        dim: usize,
        range: Range<usize>,
    ) -> Result<HostTensor, LoadError> {
        WeightSource::tensor_f32_slice(self.inner, name, dim, range)
    }
    fn tensor_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>), LoadError> {
        WeightSource::tensor_i64(self.inner, name)
    }
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

/// The library's in-process tensor-parallel group, and a helper running one closure per rank.
pub mod local_group {
    pub use dspark_server::ranks::local::{group, LocalComm};

    /// Runs `rank_fn(rank, comm)` for every rank of a `world`-rank group, each on its own
    /// thread, and returns the results in rank order.
    pub fn run_ranks<T: Send>(
        world: usize,
        rank_fn: impl Fn(usize, LocalComm) -> T + Sync,
    ) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = group(world)
                .into_iter()
                .enumerate()
                .map(|(rank, comm)| {
                    let rank_fn = &rank_fn;
                    s.spawn(move || rank_fn(rank, comm))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }
}
