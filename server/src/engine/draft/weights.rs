//! The DSpark draft's tensors (`mtp.{0..S-1}.*` in the official checkpoint) and settings.
//!
//! Each stage is shaped like a sliding-only target layer (attention without compressor or
//! indexer, a top-k routed MoE with shared expert, norms, hyper-connections). Stage 0 adds the
//! target-feature projection (`main_proj`, `main_norm`); the last stage adds the output side
//! (`norm`, `hc_head_*`, `markov_head.*`, `confidence_head.proj`). Embedding and LM head are
//! the target's.

use crate::backend::Backend;
use crate::engine::model::config::{AttentionKind, DsparkConfig, MlpKind, ModelConfig};
use crate::engine::model::hyper::HyperHead;
use crate::engine::model::load::{layer_at, LayerWeights, LoadError, Reader, Shard, WeightSource};
use crate::engine::model::manifest::{
    check_complete, head_tensors, layer_tensors, linear_dtype, ExpectedTensor, StoredDtype,
};

/// Stages of the shipped draft. vLLM uses the config's `n_mtp_layers` with this default; the
/// V4-Flash config does not carry that key.
pub const DEFAULT_NUM_STAGES: usize = 3;

pub struct DsparkWeights<B: Backend> {
    /// One block per stage, shaped like a sliding-only target layer.
    pub stages: Vec<LayerWeights<B>>,
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

/// Every tensor the draft needs, with official names and logical shapes.
pub fn draft_tensors(cfg: &ModelConfig, ds: &DsparkConfig, stages: usize) -> Vec<ExpectedTensor> {
    let (h, v, r) = (cfg.hidden_size, cfg.vocab_size, ds.markov_rank);
    // Same storage as the target's projections / norms.
    let (linear, norm) = (linear_dtype(cfg), StoredDtype::Bf16);
    let mut out = Vec::new();
    for s in 0..stages {
        let p = stage_prefix(s);
        out.extend(layer_tensors(cfg, &p, AttentionKind::Sliding, MlpKind::Moe));
        let mut push = |name: String, shape: Vec<usize>, dtype| {
            out.push(ExpectedTensor { name, shape, dtype });
        };
        if s == 0 {
            let n = ds.target_layer_ids.len();
            push(format!("{p}.main_proj.weight"), vec![h, n * h], linear);
            push(format!("{p}.main_norm.weight"), vec![h], norm);
        }
        if s + 1 == stages {
            out.extend(head_tensors(cfg, &format!("{p}.")));
            let mut push = |name: String, shape: Vec<usize>| {
                out.push(ExpectedTensor {
                    name,
                    shape,
                    dtype: norm,
                });
            };
            push(format!("{p}.markov_head.markov_w1.weight"), vec![v, r]);
            push(format!("{p}.markov_head.markov_w2.weight"), vec![v, r]);
            push(format!("{p}.confidence_head.proj.weight"), vec![1, h + r]);
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
        stage_weights.push(layer_at(&r, &p, AttentionKind::Sliding, MlpKind::Moe, cfg)?);
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
        hc_head: r.hyper_head(&format!("{last}."), hc, h)?,
        markov_w1: r.vector(&format!("{last}.markov_head.markov_w1.weight"), &[v, rank])?,
        markov_w2: r.matrix(&format!("{last}.markov_head.markov_w2.weight"), v, rank)?,
        confidence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::config::tests::flash_compress_ratios;

    #[test]
    fn flash_draft_manifest() {
        let cfg = ModelConfig::from_json(&serde_json::json!({
            "model_type": "deepseek_v4", "compress_ratios": flash_compress_ratios(),
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
