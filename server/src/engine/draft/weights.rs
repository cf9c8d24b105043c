//! The DSpark draft's tensors (`mtp.{0..S-1}.*` in the official checkpoint) and settings.
//!
//! Each stage is shaped like a sliding-only target layer (attention without compressor or
//! indexer, a top-k routed MoE with shared expert, norms, hyper-connections). Stage 0 adds the
//! target-feature projection (`main_proj`, `main_norm`); the last stage adds the output side
//! (`norm`, `hc_head_*`, `markov_head.*`, `confidence_head.proj`). Embedding and LM head are
//! the target's.

use crate::backend::Backend;
use crate::engine::model::config::{AttentionKind, DsparkConfig, MlpKind, ModelConfig};
use crate::engine::model::hyper::{HyperConnection, HyperHead};
use crate::engine::model::load::{
    attention_at, moe_at, AttentionWeights, LoadError, MoeWeights, Reader, Shard, WeightSource,
};
use crate::engine::model::manifest::{check_complete, target_tensors, ExpectedTensor};

/// Stages of the shipped draft. vLLM uses the config's `n_mtp_layers` with this default; the
/// V4-Flash config does not carry that key.
pub const DEFAULT_NUM_STAGES: usize = 3;

pub struct StageWeights<B: Backend> {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub hc_attn: HyperConnection,
    pub hc_ffn: HyperConnection,
    pub attn: AttentionWeights<B>,
    pub moe: MoeWeights<B>,
}

pub struct DsparkWeights<B: Backend> {
    pub stages: Vec<StageWeights<B>>,
    /// `[hidden, n_target_layers * hidden]`, replicated on every rank.
    pub main_proj: B::Matrix,
    pub main_norm: Vec<f32>,
    /// Final norm of the last stage.
    pub norm: Vec<f32>,
    pub hc_head: HyperHead,
    /// `[vocab, markov_rank]` host rows: the embedding of the previous token.
    pub markov_w1: Vec<f32>,
    /// `[vocab, markov_rank]` used like a head (replicated: it runs once per draft position).
    pub markov_w2: B::Matrix,
    /// `[hidden + markov_rank]`: the confidence head's single output row.
    pub confidence: Vec<f32>,
}

fn stage_prefix(s: usize) -> String {
    format!("mtp.{s}")
}

/// A one-layer config whose only layer has the shape of a draft stage (sliding-only attention,
/// top-k routed MoE), so the target manifest can list a stage's tensors.
fn stage_shaped(cfg: &ModelConfig) -> ModelConfig {
    let mut c = cfg.clone();
    c.num_hidden_layers = 1;
    c.layer_types = vec![AttentionKind::Sliding];
    c.mlp_layer_types = vec![MlpKind::Moe];
    c
}

/// Every tensor the draft needs, with official names and logical shapes.
pub fn draft_tensors(cfg: &ModelConfig, ds: &DsparkConfig, stages: usize) -> Vec<ExpectedTensor> {
    let one = stage_shaped(cfg);
    let layer_tensors: Vec<ExpectedTensor> = target_tensors(&one)
        .into_iter()
        .filter(|t| t.name.starts_with("layers.0."))
        .collect();
    let (h, hc, v, r) = (cfg.hidden_size, cfg.hc_mult, cfg.vocab_size, ds.markov_rank);
    let find_dtype = |name: &str| {
        target_tensors(&one)
            .into_iter()
            .find(|t| t.name == name)
            .map(|t| t.dtype)
    };
    // Same storage as the target's projections / norms / hc tensors.
    let linear = find_dtype("layers.0.attn.wq_a.weight");
    let norm = find_dtype("norm.weight");
    let f32_ = find_dtype("hc_head_base");
    let mut out = Vec::new();
    for s in 0..stages {
        let p = stage_prefix(s);
        for t in &layer_tensors {
            out.push(ExpectedTensor {
                name: t.name.replacen("layers.0", &p, 1),
                shape: t.shape.clone(),
                dtype: t.dtype,
            });
        }
        let mut push = |name: String, shape: Vec<usize>, dtype| {
            if let Some(dtype) = dtype {
                out.push(ExpectedTensor { name, shape, dtype });
            }
        };
        if s == 0 {
            let n = ds.target_layer_ids.len();
            push(format!("{p}.main_proj.weight"), vec![h, n * h], linear);
            push(format!("{p}.main_norm.weight"), vec![h], norm);
        }
        if s + 1 == stages {
            push(format!("{p}.norm.weight"), vec![h], norm);
            push(format!("{p}.hc_head_fn"), vec![hc, hc * h], f32_);
            push(format!("{p}.hc_head_base"), vec![hc], f32_);
            push(format!("{p}.hc_head_scale"), vec![1], f32_);
            push(
                format!("{p}.markov_head.markov_w1.weight"),
                vec![v, r],
                norm,
            );
            push(
                format!("{p}.markov_head.markov_w2.weight"),
                vec![v, r],
                norm,
            );
            push(
                format!("{p}.confidence_head.proj.weight"),
                vec![1, h + r],
                norm,
            );
        }
    }
    out
}

/// Loads every draft tensor (this rank's share of the stage layers; the heads replicated),
/// failing with the name of the first missing tensor before reading anything.
pub fn load_draft_weights<B: Backend>(
    src: &dyn WeightSource,
    backend: &B,
    cfg: &ModelConfig,
    ds: &DsparkConfig,
    stages: usize,
    shard: Shard,
) -> Result<DsparkWeights<B>, LoadError> {
    if stages == 0 {
        return Err(LoadError::Source(
            "the DSpark draft needs at least one stage".into(),
        ));
    }
    check_complete(src, &draft_tensors(cfg, ds, stages))?;
    let r = Reader {
        src,
        backend,
        shard,
    };
    let (h, hc, v, rank) = (cfg.hidden_size, cfg.hc_mult, cfg.vocab_size, ds.markov_rank);
    let mut stage_weights = Vec::with_capacity(stages);
    for s in 0..stages {
        let p = stage_prefix(s);
        tracing::debug!(stage = s, "loading DSpark stage");
        stage_weights.push(StageWeights {
            attn_norm: r.vector(&format!("{p}.attn_norm.weight"), &[h])?,
            ffn_norm: r.vector(&format!("{p}.ffn_norm.weight"), &[h])?,
            hc_attn: r.hyper(&format!("{p}.hc_attn"), hc, h)?,
            hc_ffn: r.hyper(&format!("{p}.hc_ffn"), hc, h)?,
            attn: attention_at(&r, &format!("{p}.attn"), AttentionKind::Sliding, cfg)?,
            moe: moe_at(&r, &format!("{p}.ffn"), MlpKind::Moe, cfg)?,
        });
    }
    let first = stage_prefix(0);
    let last = stage_prefix(stages - 1);
    let n = ds.target_layer_ids.len();
    let confidence = r.vector(
        &format!("{last}.confidence_head.proj.weight"),
        &[1, h + rank],
    )?;
    Ok(DsparkWeights {
        stages: stage_weights,
        main_proj: r.matrix(&format!("{first}.main_proj.weight"), h, n * h)?,
        main_norm: r.vector(&format!("{first}.main_norm.weight"), &[h])?,
        norm: r.vector(&format!("{last}.norm.weight"), &[h])?,
        hc_head: HyperHead {
            fn_: r.vector(&format!("{last}.hc_head_fn"), &[hc, hc * h])?,
            base: r.vector(&format!("{last}.hc_head_base"), &[hc])?,
            scale: r.vector(&format!("{last}.hc_head_scale"), &[1])?[0],
        },
        markov_w1: r.vector(&format!("{last}.markov_head.markov_w1.weight"), &[v, rank])?,
        markov_w2: r.matrix(&format!("{last}.markov_head.markov_w2.weight"), v, rank)?,
        confidence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_draft_manifest() {
        let mut ratios = vec![0, 0];
        for _ in 0..20 {
            ratios.extend([4, 128]);
        }
        ratios.extend([4, 0]);
        let cfg = ModelConfig::from_json(&serde_json::json!({
            "model_type": "deepseek_v4", "compress_ratios": ratios,
            "quantization_config": {"quant_method": "fp8"}, "expert_dtype": "fp4",
            "dspark_block_size": 5, "dspark_noise_token_id": 128799,
            "dspark_target_layer_ids": [40, 41, 42], "dspark_markov_rank": 256
        }))
        .unwrap();
        let ds = cfg.dspark.clone().unwrap();
        let m = draft_tensors(&cfg, &ds, 3);
        let find = |n: &str| {
            m.iter()
                .find(|t| t.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(find("mtp.0.main_proj.weight").shape, vec![4096, 12288]);
        assert_eq!(
            find("mtp.2.markov_head.markov_w1.weight").shape,
            vec![129280, 256]
        );
        assert_eq!(
            find("mtp.2.confidence_head.proj.weight").shape,
            vec![1, 4352]
        );
        assert_eq!(find("mtp.1.ffn.gate.bias").shape, vec![256]);
        // The 12 shared-expert tensors a recipe once dropped: 3 per stage here, plus scales
        // handled by the weight source.
        assert_eq!(
            m.iter()
                .filter(|t| t.name.contains(".shared_experts."))
                .count(),
            9
        );
        assert!(m.iter().all(|t| !t.name.contains("tid2eid")));
        assert!(m.iter().all(|t| !t.name.contains("compressor")));
        assert!(m.iter().all(|t| t.name.starts_with("mtp.")));
        assert!(m.iter().all(|t| !t.name.starts_with("mtp.1.main_proj")));
        assert!(m.iter().all(|t| !t.name.starts_with("mtp.0.norm.")));
    }
}
