//! Turning checkpoint tensors (official DeepSeek names, dequantized to f32) into the weights of
//! this rank's share of the model.

use super::config::{AttentionKind, MlpKind, ModelConfig};
use super::hyper::{HyperConnection, HyperHead};
use crate::backend::{Backend, BackendError, PackedWeight};
use std::ops::Range;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("checkpoint is missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {got:?}, the config implies {want:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("tensor parallel: {0}")]
    Sharding(String),
    #[error("KV pool: {0}")]
    KvPool(String),
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error("weights: {0}")]
    Source(String),
}

/// A dense f32 tensor read from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Where weights come from: a checkpoint on disk or deterministic dummy values. Names are the
/// official DeepSeek tensor names; quantized tensors come back dequantized.
pub trait WeightSource {
    fn contains(&self, name: &str) -> bool;
    fn tensor_f32(&self, name: &str) -> Result<HostTensor, LoadError>;
    /// The sub-range `range` of dimension `dim` (tensor-parallel shards).
    fn tensor_f32_slice(
        &self,
        name: &str,
        dim: usize,
        range: Range<usize>,
    ) -> Result<HostTensor, LoadError>;
    fn tensor_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>), LoadError>;
    /// A quantized tensor in its checkpoint encoding with its logical shape, optionally only
    /// `range` along `dim`; `None` when it is not quantized or the slice cuts a scale group
    /// (the caller then reads it widened to f32).
    fn packed(
        &self,
        _name: &str,
        _slice: Option<(usize, Range<usize>)>,
    ) -> Result<Option<(Vec<usize>, PackedWeight)>, LoadError> {
        Ok(None)
    }
}

/// This rank's place in the tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world_size: usize,
}

impl Shard {
    pub const SINGLE: Shard = Shard {
        rank: 0,
        world_size: 1,
    };

    /// This rank's contiguous part of `n` items (heads, groups, channels, vocab rows).
    pub fn range(&self, n: usize, what: &str) -> Result<Range<usize>, LoadError> {
        if !n.is_multiple_of(self.world_size) {
            return Err(LoadError::Sharding(format!(
                "{what} ({n}) is not divisible by world size {}",
                self.world_size
            )));
        }
        let per = n / self.world_size;
        Ok(self.rank * per..(self.rank + 1) * per)
    }
}

/// Reads tensors with shape checks, slicing for this rank when sharded.
pub struct Reader<'a, B: Backend> {
    pub src: &'a dyn WeightSource,
    pub backend: &'a B,
    pub shard: Shard,
}

impl<'a, B: Backend> Reader<'a, B> {
    fn check(name: &str, got: &[usize], want: &[usize]) -> Result<(), LoadError> {
        if got != want {
            return Err(LoadError::Shape {
                name: name.to_string(),
                got: got.to_vec(),
                want: want.to_vec(),
            });
        }
        Ok(())
    }

    fn read(&self, name: &str) -> Result<HostTensor, LoadError> {
        if !self.src.contains(name) {
            return Err(LoadError::MissingTensor(name.to_string()));
        }
        self.src.tensor_f32(name)
    }

    /// A whole tensor as a flat vector of the expected shape.
    pub fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let t = self.read(name)?;
        Self::check(name, &t.shape, shape)?;
        Ok(t.data)
    }

    /// The packed form of `name` (sliced), when the backend computes on packed weights and the
    /// tensor is stored quantized.
    fn packed_matrix(
        &self,
        name: &str,
        want: [usize; 2],
        slice: Option<(usize, Range<usize>)>,
    ) -> Result<Option<B::Matrix>, LoadError> {
        if !self.backend.accepts_packed() || !self.src.contains(name) {
            return Ok(None);
        }
        match self.src.packed(name, slice)? {
            Some((shape, w)) => {
                Self::check(name, &shape, &want)?;
                Ok(Some(self.backend.packed_matrix(want[0], want[1], w)?))
            }
            None => Ok(None),
        }
    }

    /// A whole `[rows, cols]` matrix on the device.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<B::Matrix, LoadError> {
        if let Some(m) = self.packed_matrix(name, [rows, cols], None)? {
            return Ok(m);
        }
        let data = self.vector(name, &[rows, cols])?;
        Ok(self.backend.matrix(rows, cols, data)?)
    }

    /// Rows `range` of a `[rows, cols]` matrix (column-parallel: this rank's output features).
    pub fn matrix_rows(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        range: Range<usize>,
    ) -> Result<B::Matrix, LoadError> {
        self.matrix_slice(name, [rows, cols], 0, range)
    }

    /// Columns `range` of a `[rows, cols]` matrix (row-parallel: this rank's input features).
    pub fn matrix_cols(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        range: Range<usize>,
    ) -> Result<B::Matrix, LoadError> {
        self.matrix_slice(name, [rows, cols], 1, range)
    }

    /// `range` along `dim` (0: rows, 1: columns) of a `[rows, cols]` matrix; the whole matrix
    /// when the range covers the dim.
    fn matrix_slice(
        &self,
        name: &str,
        full: [usize; 2],
        dim: usize,
        range: Range<usize>,
    ) -> Result<B::Matrix, LoadError> {
        if range.len() == full[dim] {
            return self.matrix(name, full[0], full[1]);
        }
        if !self.src.contains(name) {
            return Err(LoadError::MissingTensor(name.to_string()));
        }
        let mut want = full;
        want[dim] = range.len();
        if let Some(m) = self.packed_matrix(name, want, Some((dim, range.clone())))? {
            return Ok(m);
        }
        let t = self.src.tensor_f32_slice(name, dim, range)?;
        Self::check(name, &t.shape, &want)?;
        Ok(self.backend.matrix(want[0], want[1], t.data)?)
    }

    pub fn slice_vector(
        &self,
        name: &str,
        len: usize,
        range: Range<usize>,
    ) -> Result<Vec<f32>, LoadError> {
        let v = self.vector(name, &[len])?;
        Ok(v[range].to_vec())
    }

    /// The output hyper-connection head, names prefixed by `prefix` (empty for the target,
    /// `mtp.2.` for the last DSpark stage).
    pub fn hyper_head(
        &self,
        prefix: &str,
        hc: usize,
        hidden: usize,
    ) -> Result<HyperHead, LoadError> {
        Ok(HyperHead {
            fn_: self.vector(&format!("{prefix}hc_head_fn"), &[hc, hc * hidden])?,
            base: self.vector(&format!("{prefix}hc_head_base"), &[hc])?,
            scale: self.vector(&format!("{prefix}hc_head_scale"), &[1])?[0],
        })
    }

    pub fn hyper(
        &self,
        prefix: &str,
        hc: usize,
        hidden: usize,
    ) -> Result<HyperConnection, LoadError> {
        let mix = (2 + hc) * hc;
        let scale = self.vector(&format!("{prefix}_scale"), &[3])?;
        Ok(HyperConnection {
            fn_: self.vector(&format!("{prefix}_fn"), &[mix, hc * hidden])?,
            base: self.vector(&format!("{prefix}_base"), &[mix])?,
            scale: [scale[0], scale[1], scale[2]],
        })
    }
}

pub struct CompressorWeights<B: Backend> {
    /// `[coff * dim, hidden]`.
    pub wkv: B::Matrix,
    pub wgate: B::Matrix,
    /// `[ratio, coff * dim]` position bias added to the gate.
    pub ape: Vec<f32>,
    /// RMSNorm weight `[dim]`.
    pub norm: Vec<f32>,
}

pub struct IndexerWeights<B: Backend> {
    /// `[local_heads * index_head_dim, q_lora_rank]`.
    pub wq_b: B::Matrix,
    /// `[local_heads, hidden]`.
    pub weights_proj: B::Matrix,
    pub compressor: CompressorWeights<B>,
}

pub struct AttentionWeights<B: Backend> {
    pub wq_a: B::Matrix,
    pub q_norm: Vec<f32>,
    /// `[local_heads * head_dim, q_lora_rank]`.
    pub wq_b: B::Matrix,
    pub wkv: B::Matrix,
    pub kv_norm: Vec<f32>,
    /// One `[o_lora_rank, heads_per_group * head_dim]` block per local group.
    pub wo_a: Vec<B::Matrix>,
    /// `[hidden, local_groups * o_lora_rank]`.
    pub wo_b: B::Matrix,
    /// Per local head.
    pub sinks: Vec<f32>,
    pub compressor: Option<CompressorWeights<B>>,
    pub indexer: Option<IndexerWeights<B>>,
}

pub struct ExpertWeights<B: Backend> {
    /// Gate `[local_inter, hidden]`.
    pub w1: B::Matrix,
    /// Up `[local_inter, hidden]`.
    pub w3: B::Matrix,
    /// Down `[hidden, local_inter]`.
    pub w2: B::Matrix,
}

pub enum Routing {
    /// `tid2eid`: `[vocab, top_k]` expert ids per token.
    Hash(Vec<u32>),
    /// `e_score_correction_bias` per expert.
    TopK(Vec<f32>),
}

pub struct MoeWeights<B: Backend> {
    pub gate: B::Matrix,
    pub routing: Routing,
    /// The routed experts, in id order.
    pub experts: B::ExpertBank,
    pub shared: ExpertWeights<B>,
}

pub struct LayerWeights<B: Backend> {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub hc_attn: HyperConnection,
    pub hc_ffn: HyperConnection,
    pub attn: AttentionWeights<B>,
    pub moe: MoeWeights<B>,
}

pub struct ModelWeights<B: Backend> {
    pub embed: B::Matrix,
    pub layers: Vec<LayerWeights<B>>,
    pub norm: Vec<f32>,
    pub hc_head: HyperHead,
    /// This rank's vocabulary rows of the LM head.
    pub head: B::Matrix,
}

fn compressor<B: Backend>(
    r: &Reader<'_, B>,
    prefix: &str,
    cfg: &ModelConfig,
    dim: usize,
    coff: usize,
    ratio: usize,
) -> Result<CompressorWeights<B>, LoadError> {
    let h = cfg.hidden_size;
    Ok(CompressorWeights {
        wkv: r.matrix(&format!("{prefix}.wkv.weight"), coff * dim, h)?,
        wgate: r.matrix(&format!("{prefix}.wgate.weight"), coff * dim, h)?,
        ape: r.vector(&format!("{prefix}.ape"), &[ratio, coff * dim])?,
        norm: r.vector(&format!("{prefix}.norm.weight"), &[dim])?,
    })
}

fn expert<B: Backend>(
    r: &Reader<'_, B>,
    prefix: &str,
    cfg: &ModelConfig,
) -> Result<ExpertWeights<B>, LoadError> {
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let part = r.shard.range(i, "moe_intermediate_size")?;
    Ok(ExpertWeights {
        w1: r.matrix_rows(&format!("{prefix}.w1.weight"), i, h, part.clone())?,
        w3: r.matrix_rows(&format!("{prefix}.w3.weight"), i, h, part.clone())?,
        w2: r.matrix_cols(&format!("{prefix}.w2.weight"), h, i, part)?,
    })
}

/// One block under `p` (`layers.3`, or `mtp.0` for a DSpark stage): norms,
/// hyper-connections, attention of kind `attn`, MoE of kind `mlp`.
pub fn layer_at<B: Backend>(
    r: &Reader<'_, B>,
    p: &str,
    attn: AttentionKind,
    mlp: MlpKind,
    cfg: &ModelConfig,
) -> Result<LayerWeights<B>, LoadError> {
    let (h, hc) = (cfg.hidden_size, cfg.hc_mult);
    Ok(LayerWeights {
        attn_norm: r.vector(&format!("{p}.attn_norm.weight"), &[h])?,
        ffn_norm: r.vector(&format!("{p}.ffn_norm.weight"), &[h])?,
        hc_attn: r.hyper(&format!("{p}.hc_attn"), hc, h)?,
        hc_ffn: r.hyper(&format!("{p}.hc_ffn"), hc, h)?,
        attn: attention_at(r, &format!("{p}.attn"), attn, cfg)?,
        moe: moe_at(r, &format!("{p}.ffn"), mlp, cfg)?,
    })
}

/// Attention weights under `p` (e.g. `layers.3.attn`, or `mtp.0.attn` for a DSpark stage).
pub fn attention_at<B: Backend>(
    r: &Reader<'_, B>,
    p: &str,
    kind: AttentionKind,
    cfg: &ModelConfig,
) -> Result<AttentionWeights<B>, LoadError> {
    let (h, hd, nh, qr) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.q_lora_rank,
    );
    let groups = r.shard.range(cfg.o_groups, "o_groups")?;
    let heads = r.shard.range(nh, "num_attention_heads")?;
    let hpg = nh / cfg.o_groups;
    let group_in = hpg * hd;
    let orank = cfg.o_lora_rank;
    let wo_a = groups
        .clone()
        .map(|g| {
            r.matrix_rows(
                &format!("{p}.wo_a.weight"),
                cfg.o_groups * orank,
                group_in,
                g * orank..(g + 1) * orank,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (compressor_w, indexer_w) = match kind {
        AttentionKind::Sliding => (None, None),
        AttentionKind::Hca => (
            Some(compressor(
                r,
                &format!("{p}.compressor"),
                cfg,
                hd,
                1,
                cfg.compress_rate_hca,
            )?),
            None,
        ),
        AttentionKind::Csa => {
            // Every rank holds all the indexer heads (8 MB a layer in FP8): each then scores
            // whole rows, so a tensor-parallel group splits the rows between its ranks and
            // exchanges only each rank's top k, not the score matrix (or, at short contexts, each
            // rank selects alone and nothing is exchanged).
            let ih = 0..cfg.index_n_heads;
            let ihd = cfg.index_head_dim;
            (
                Some(compressor(
                    r,
                    &format!("{p}.compressor"),
                    cfg,
                    hd,
                    2,
                    cfg.compress_rate_csa,
                )?),
                Some(IndexerWeights {
                    wq_b: r.matrix_rows(
                        &format!("{p}.indexer.wq_b.weight"),
                        cfg.index_n_heads * ihd,
                        qr,
                        ih.start * ihd..ih.end * ihd,
                    )?,
                    weights_proj: r.matrix_rows(
                        &format!("{p}.indexer.weights_proj.weight"),
                        cfg.index_n_heads,
                        h,
                        ih,
                    )?,
                    compressor: compressor(
                        r,
                        &format!("{p}.indexer.compressor"),
                        cfg,
                        ihd,
                        2,
                        cfg.compress_rate_csa,
                    )?,
                }),
            )
        }
    };
    Ok(AttentionWeights {
        wq_a: r.matrix(&format!("{p}.wq_a.weight"), qr, h)?,
        q_norm: r.vector(&format!("{p}.q_norm.weight"), &[qr])?,
        wq_b: r.matrix_rows(
            &format!("{p}.wq_b.weight"),
            nh * hd,
            qr,
            heads.start * hd..heads.end * hd,
        )?,
        wkv: r.matrix(&format!("{p}.wkv.weight"), hd, h)?,
        kv_norm: r.vector(&format!("{p}.kv_norm.weight"), &[hd])?,
        wo_a,
        wo_b: r.matrix_cols(
            &format!("{p}.wo_b.weight"),
            h,
            cfg.o_groups * orank,
            groups.start * orank..groups.end * orank,
        )?,
        sinks: r.slice_vector(&format!("{p}.attn_sink"), nh, heads)?,
        compressor: compressor_w,
        indexer: indexer_w,
    })
}

/// MoE weights under `p` (e.g. `layers.3.ffn`, or `mtp.0.ffn` for a DSpark stage).
pub fn moe_at<B: Backend>(
    r: &Reader<'_, B>,
    p: &str,
    kind: MlpKind,
    cfg: &ModelConfig,
) -> Result<MoeWeights<B>, LoadError> {
    let (h, e) = (cfg.hidden_size, cfg.n_routed_experts);
    let routing = match kind {
        MlpKind::HashMoe => {
            let name = format!("{p}.gate.tid2eid");
            if !r.src.contains(&name) {
                return Err(LoadError::MissingTensor(name));
            }
            let (shape, ids) = r.src.tensor_i64(&name)?;
            let want = [cfg.vocab_size, cfg.num_experts_per_tok];
            if shape != want {
                return Err(LoadError::Shape {
                    name,
                    got: shape,
                    want: want.to_vec(),
                });
            }
            let ids = ids
                .into_iter()
                .map(|v| {
                    u32::try_from(v)
                        .ok()
                        .filter(|&u| (u as usize) < e)
                        .ok_or_else(|| LoadError::Tensor {
                            name: name.clone(),
                            reason: format!("expert id {v} out of range 0..{e}"),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Routing::Hash(ids)
        }
        MlpKind::Moe => Routing::TopK(r.vector(&format!("{p}.gate.bias"), &[e])?),
    };
    Ok(MoeWeights {
        gate: r.matrix(&format!("{p}.gate.weight"), e, h)?,
        routing,
        experts: r.backend.expert_bank(
            (0..e)
                .map(|x| expert(r, &format!("{p}.experts.{x}"), cfg).map(|w| [w.w1, w.w3, w.w2]))
                .collect::<Result<Vec<_>, _>>()?,
        )?,
        shared: expert(r, &format!("{p}.shared_experts"), cfg)?,
    })
}

/// Loads this rank's weights of every target layer.
pub fn load_weights<B: Backend>(
    src: &dyn WeightSource,
    backend: &B,
    cfg: &ModelConfig,
    shard: Shard,
) -> Result<ModelWeights<B>, LoadError> {
    let r = Reader {
        src,
        backend,
        shard,
    };
    let (h, hc, v) = (cfg.hidden_size, cfg.hc_mult, cfg.vocab_size);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        tracing::debug!(layer = l, "loading layer");
        layers.push(layer_at(
            &r,
            &format!("layers.{l}"),
            cfg.layer_types[l],
            cfg.mlp_layer_types[l],
            cfg,
        )?);
    }
    let head_name = if cfg.tie_word_embeddings && !src.contains("head.weight") {
        "embed.weight"
    } else {
        "head.weight"
    };
    Ok(ModelWeights {
        embed: r.matrix("embed.weight", v, h)?,
        layers,
        norm: r.vector("norm.weight", &[h])?,
        hc_head: r.hyper_head("", hc, h)?,
        head: r.matrix_rows(head_name, v, h, shard.range(v, "vocab_size")?)?,
    })
}
