//! Test support: a weight source over a transformers-saved safetensors file, mapping official
//! DeepSeek names to transformers' names (bf16 / f32 / i64 only).
#![allow(dead_code)]

use dspark_server::engine::model::{HostTensor, LoadError, WeightSource};
use safetensors::{Dtype, SafeTensors};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub struct HfFile {
    bytes: Vec<u8>,
}

/// Where an official name lives in the transformers file.
enum Loc {
    Plain(String),
    /// `(tensor, expert, row range)` of a merged expert tensor.
    Expert(String, usize, Option<(usize, bool)>),
}

fn map_name(name: &str) -> Loc {
    let top = match name {
        "embed.weight" => Some("model.embed_tokens.weight"),
        "head.weight" => Some("lm_head.weight"),
        "norm.weight" => Some("model.norm.weight"),
        "hc_head_fn" => Some("model.hc_head.hc_fn"),
        "hc_head_base" => Some("model.hc_head.hc_base"),
        "hc_head_scale" => Some("model.hc_head.hc_scale"),
        _ => None,
    };
    if let Some(t) = top {
        return Loc::Plain(t.into());
    }
    let Some(rest) = name.strip_prefix("layers.") else {
        return Loc::Plain(name.into());
    };
    let (l, rest) = rest.split_once('.').unwrap();
    let p = format!("model.layers.{l}.");
    if let Some(e) = rest.strip_prefix("ffn.experts.") {
        let (e, w) = e.split_once('.').unwrap();
        let e: usize = e.parse().unwrap();
        return match w {
            "w1.weight" => Loc::Expert(format!("{p}mlp.experts.gate_up_proj"), e, Some((0, false))),
            "w3.weight" => Loc::Expert(format!("{p}mlp.experts.gate_up_proj"), e, Some((0, true))),
            _ => Loc::Expert(format!("{p}mlp.experts.down_proj"), e, None),
        };
    }
    let table: &[(&str, &str)] = &[
        ("attn_norm.weight", "input_layernorm.weight"),
        ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ("hc_attn_fn", "attn_hc.fn"),
        ("hc_attn_base", "attn_hc.base"),
        ("hc_attn_scale", "attn_hc.scale"),
        ("hc_ffn_fn", "ffn_hc.fn"),
        ("hc_ffn_base", "ffn_hc.base"),
        ("hc_ffn_scale", "ffn_hc.scale"),
        ("attn.wq_a.weight", "self_attn.q_a_proj.weight"),
        ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
        ("attn.wq_b.weight", "self_attn.q_b_proj.weight"),
        ("attn.wkv.weight", "self_attn.kv_proj.weight"),
        ("attn.kv_norm.weight", "self_attn.kv_norm.weight"),
        ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
        ("attn.wo_b.weight", "self_attn.o_b_proj.weight"),
        ("attn.attn_sink", "self_attn.sinks"),
        (
            "attn.compressor.wkv.weight",
            "self_attn.compressor.kv_proj.weight",
        ),
        (
            "attn.compressor.wgate.weight",
            "self_attn.compressor.gate_proj.weight",
        ),
        ("attn.compressor.ape", "self_attn.compressor.position_bias"),
        (
            "attn.compressor.norm.weight",
            "self_attn.compressor.kv_norm.weight",
        ),
        (
            "attn.indexer.wq_b.weight",
            "self_attn.compressor.indexer.q_b_proj.weight",
        ),
        (
            "attn.indexer.weights_proj.weight",
            "self_attn.compressor.indexer.scorer.weights_proj.weight",
        ),
        (
            "attn.indexer.compressor.wkv.weight",
            "self_attn.compressor.indexer.kv_proj.weight",
        ),
        (
            "attn.indexer.compressor.wgate.weight",
            "self_attn.compressor.indexer.gate_proj.weight",
        ),
        (
            "attn.indexer.compressor.ape",
            "self_attn.compressor.indexer.position_bias",
        ),
        (
            "attn.indexer.compressor.norm.weight",
            "self_attn.compressor.indexer.kv_norm.weight",
        ),
        ("ffn.gate.weight", "mlp.gate.weight"),
        ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
        ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
        (
            "ffn.shared_experts.w1.weight",
            "mlp.shared_experts.gate_proj.weight",
        ),
        (
            "ffn.shared_experts.w3.weight",
            "mlp.shared_experts.up_proj.weight",
        ),
        (
            "ffn.shared_experts.w2.weight",
            "mlp.shared_experts.down_proj.weight",
        ),
    ];
    for (a, b) in table {
        if rest == *a {
            return Loc::Plain(format!("{p}{b}"));
        }
    }
    Loc::Plain(format!("{p}{rest}"))
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        other => panic!("unsupported dtype {other:?}"),
    }
}

impl HfFile {
    pub fn open(path: &Path) -> Self {
        Self {
            bytes: std::fs::read(path).unwrap(),
        }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    pub fn names(&self) -> Vec<String> {
        self.st()
            .names()
            .into_iter()
            .map(|s| s.to_string())
            .collect()
    }
    pub fn raw_f32(&self, name: &str) -> HostTensor {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        HostTensor {
            shape: t.shape().to_vec(),
            data: to_f32(t.dtype(), t.data()),
        }
    }
    pub fn raw_i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        let v = t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }
}

impl WeightSource for HfFile {
    fn contains(&self, name: &str) -> bool {
        let names = self.names();
        match map_name(name) {
            Loc::Plain(n) => names.contains(&n),
            Loc::Expert(n, _, _) => names.contains(&n),
        }
    }
    fn tensor_f32(&self, name: &str) -> Result<HostTensor, LoadError> {
        match map_name(name) {
            Loc::Plain(n) => Ok(self.raw_f32(&n)),
            Loc::Expert(n, e, part) => {
                let t = self.raw_f32(&n);
                let (rows, cols) = (t.shape[1], t.shape[2]);
                let per = rows * cols;
                let m = &t.data[e * per..(e + 1) * per];
                Ok(match part {
                    None => HostTensor {
                        shape: vec![rows, cols],
                        data: m.to_vec(),
                    },
                    Some((_, up)) => {
                        let half = rows / 2;
                        let start = if up { half * cols } else { 0 };
                        HostTensor {
                            shape: vec![half, cols],
                            data: m[start..start + half * cols].to_vec(),
                        }
                    }
                })
            }
        }
    }
    fn tensor_f32_slice(
        &self,
        name: &str,
        dim: usize,
        range: Range<usize>,
    ) -> Result<HostTensor, LoadError> {
        let t = self.tensor_f32(name)?;
        let (rows, cols) = (t.shape[0], t.shape[1]);
        Ok(if dim == 0 {
            HostTensor {
                shape: vec![range.len(), cols],
                data: t.data[range.start * cols..range.end * cols].to_vec(),
            }
        } else {
            let data = (0..rows)
                .flat_map(|r| t.data[r * cols + range.start..r * cols + range.end].to_vec())
                .collect();
            HostTensor {
                shape: vec![rows, range.len()],
                data,
            }
        })
    }
    fn tensor_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>), LoadError> {
        match map_name(name) {
            Loc::Plain(n) => Ok(self.raw_i64(&n)),
            Loc::Expert(..) => unreachable!(),
        }
    }
}

/// An in-process tensor-parallel group for tests: one `LocalComm` per rank, each used from its
/// own thread. Sums run in rank order, so every rank gets bit-identical results.
pub mod local_group {
    use dspark_server::ranks::{CommError, Communicator};
    use std::sync::{Arc, Barrier, Mutex};

    struct Shared {
        slots: Mutex<Vec<Vec<f32>>>,
        bytes: Mutex<Vec<u8>>,
        barrier: Barrier,
    }

    pub struct LocalComm {
        rank: usize,
        world: usize,
        shared: Arc<Shared>,
    }

    pub fn group(world: usize) -> Vec<LocalComm> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![Vec::new(); world]),
            bytes: Mutex::new(Vec::new()),
            barrier: Barrier::new(world),
        });
        (0..world)
            .map(|rank| LocalComm {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }

    impl LocalComm {
        fn exchange(&self, local: &[f32]) -> Vec<Vec<f32>> {
            self.shared.slots.lock().unwrap()[self.rank] = local.to_vec();
            self.shared.barrier.wait();
            let all = self.shared.slots.lock().unwrap().clone();
            self.shared.barrier.wait();
            all
        }
    }

    impl Communicator for LocalComm {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
            let all = self.exchange(data);
            for (i, d) in data.iter_mut().enumerate() {
                *d = all.iter().map(|v| v[i]).sum();
            }
            Ok(())
        }
        fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
            Ok(self.exchange(local).concat())
        }
        fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> Result<(), CommError> {
            if self.rank == root {
                *self.shared.bytes.lock().unwrap() = data.clone();
            }
            self.shared.barrier.wait();
            if self.rank != root {
                *data = self.shared.bytes.lock().unwrap().clone();
            }
            self.shared.barrier.wait();
            Ok(())
        }
    }
}
