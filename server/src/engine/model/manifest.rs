//! The tensors a DeepSeek-V4 target checkpoint must hold, derived from its config: official
//! names, logical (dequantized) shapes and stored dtypes. Used to fail loudly on a missing tensor
//! before loading anything, and to drive `--load-format dummy`.
//!
//! The DSpark draft's `mtp.*` tensors are listed by `engine::draft`.

use super::config::{AttentionKind, ExpertDtype, MlpKind, ModelConfig};
use super::load::{LoadError, WeightSource};

/// How a tensor is stored in the official checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    Bf16,
    /// FP8 e4m3 with one ue8m0 scale per 128x128 block (`<name>.scale`, or `weight_scale_inv`).
    Fp8Block,
    /// FP4 e2m1, two per byte, one ue8m0 scale per 32 values along K.
    Fp4Expert,
    I64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub name: String,
    /// Logical shape (after dequantization).
    pub shape: Vec<usize>,
    pub dtype: StoredDtype,
}

/// Every target-model tensor of the checkpoint described by `cfg`.
pub fn target_tensors(cfg: &ModelConfig) -> Vec<ExpectedTensor> {
    let quant = cfg.quantization.is_some();
    let linear = if quant {
        StoredDtype::Fp8Block
    } else {
        StoredDtype::Bf16
    };
    let expert_dt = match (cfg.expert_dtype, quant) {
        (ExpertDtype::Fp4, _) => StoredDtype::Fp4Expert,
        (ExpertDtype::Default, true) => StoredDtype::Fp8Block,
        (ExpertDtype::Default, false) => StoredDtype::Bf16,
    };
    let (h, hc, hd, nh, qr) = (
        cfg.hidden_size,
        cfg.hc_mult,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.q_lora_rank,
    );
    let (e, inter, v) = (
        cfg.n_routed_experts,
        cfg.moe_intermediate_size,
        cfg.vocab_size,
    );
    let mix = (2 + hc) * hc;
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, dtype: StoredDtype| {
        out.push(ExpectedTensor { name, shape, dtype })
    };
    use StoredDtype::{Bf16, F32, I64};
    push("embed.weight".into(), vec![v, h], Bf16);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("layers.{l}");
        push(format!("{p}.attn_norm.weight"), vec![h], Bf16);
        push(format!("{p}.ffn_norm.weight"), vec![h], Bf16);
        for site in ["attn", "ffn"] {
            push(format!("{p}.hc_{site}_fn"), vec![mix, hc * h], F32);
            push(format!("{p}.hc_{site}_base"), vec![mix], F32);
            push(format!("{p}.hc_{site}_scale"), vec![3], F32);
        }
        let a = format!("{p}.attn");
        push(format!("{a}.wq_a.weight"), vec![qr, h], linear);
        push(format!("{a}.q_norm.weight"), vec![qr], Bf16);
        push(format!("{a}.wq_b.weight"), vec![nh * hd, qr], linear);
        push(format!("{a}.wkv.weight"), vec![hd, h], linear);
        push(format!("{a}.kv_norm.weight"), vec![hd], Bf16);
        push(
            format!("{a}.wo_a.weight"),
            vec![cfg.o_groups * cfg.o_lora_rank, nh * hd / cfg.o_groups],
            linear,
        );
        push(
            format!("{a}.wo_b.weight"),
            vec![h, cfg.o_groups * cfg.o_lora_rank],
            linear,
        );
        push(format!("{a}.attn_sink"), vec![nh], F32);
        let mut compressor = |prefix: String, dim: usize, coff: usize, ratio: usize| {
            push(format!("{prefix}.wkv.weight"), vec![coff * dim, h], Bf16);
            push(format!("{prefix}.wgate.weight"), vec![coff * dim, h], Bf16);
            push(format!("{prefix}.ape"), vec![ratio, coff * dim], F32);
            push(format!("{prefix}.norm.weight"), vec![dim], Bf16);
        };
        match cfg.layer_types[l] {
            AttentionKind::Sliding => {}
            AttentionKind::Hca => {
                compressor(format!("{a}.compressor"), hd, 1, cfg.compress_rate_hca)
            }
            AttentionKind::Csa => {
                compressor(format!("{a}.compressor"), hd, 2, cfg.compress_rate_csa);
                compressor(
                    format!("{a}.indexer.compressor"),
                    cfg.index_head_dim,
                    2,
                    cfg.compress_rate_csa,
                );
                push(
                    format!("{a}.indexer.wq_b.weight"),
                    vec![cfg.index_n_heads * cfg.index_head_dim, qr],
                    linear,
                );
                push(
                    format!("{a}.indexer.weights_proj.weight"),
                    vec![cfg.index_n_heads, h],
                    Bf16,
                );
            }
        }
        let f = format!("{p}.ffn");
        push(format!("{f}.gate.weight"), vec![e, h], Bf16);
        match cfg.mlp_layer_types[l] {
            MlpKind::HashMoe => push(
                format!("{f}.gate.tid2eid"),
                vec![v, cfg.num_experts_per_tok],
                I64,
            ),
            MlpKind::Moe => push(format!("{f}.gate.bias"), vec![e], F32),
        }
        for x in 0..e {
            push(
                format!("{f}.experts.{x}.w1.weight"),
                vec![inter, h],
                expert_dt,
            );
            push(
                format!("{f}.experts.{x}.w3.weight"),
                vec![inter, h],
                expert_dt,
            );
            push(
                format!("{f}.experts.{x}.w2.weight"),
                vec![h, inter],
                expert_dt,
            );
        }
        push(
            format!("{f}.shared_experts.w1.weight"),
            vec![inter, h],
            linear,
        );
        push(
            format!("{f}.shared_experts.w3.weight"),
            vec![inter, h],
            linear,
        );
        push(
            format!("{f}.shared_experts.w2.weight"),
            vec![h, inter],
            linear,
        );
    }
    push("norm.weight".into(), vec![h], Bf16);
    push("hc_head_fn".into(), vec![hc, hc * h], F32);
    push("hc_head_base".into(), vec![hc], F32);
    push("hc_head_scale".into(), vec![1], F32);
    if !cfg.tie_word_embeddings {
        push("head.weight".into(), vec![v, h], Bf16);
    }
    out
}

/// Fails with the first expected tensor the source lacks (and how many more are missing).
pub fn check_complete(
    src: &dyn WeightSource,
    expected: &[ExpectedTensor],
) -> Result<(), LoadError> {
    let missing: Vec<&str> = expected
        .iter()
        .filter(|t| !src.contains(&t.name))
        .map(|t| t.name.as_str())
        .collect();
    match missing.as_slice() {
        [] => Ok(()),
        [one] => Err(LoadError::MissingTensor((*one).to_string())),
        [first, rest @ ..] => Err(LoadError::MissingTensor(format!(
            "{first}` (and {} more, e.g. `{}`)",
            rest.len(),
            rest[rest.len() - 1]
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_manifest_counts() {
        let mut ratios = vec![0, 0];
        for _ in 0..20 {
            ratios.extend([4, 128]);
        }
        ratios.extend([4, 0]);
        let cfg = ModelConfig::from_json(&serde_json::json!({
            "model_type": "deepseek_v4", "compress_ratios": ratios,
            "quantization_config": {"quant_method": "fp8"}, "expert_dtype": "fp4"
        }))
        .unwrap();
        let m = target_tensors(&cfg);
        let find = |n: &str| m.iter().find(|t| t.name == n).unwrap();
        assert_eq!(find("layers.0.attn.wq_b.weight").shape, vec![32768, 1024]);
        assert_eq!(find("layers.0.attn.wo_a.weight").shape, vec![8192, 4096]);
        assert_eq!(
            find("layers.5.ffn.experts.255.w2.weight").dtype,
            StoredDtype::Fp4Expert
        );
        assert_eq!(find("layers.2.ffn.gate.tid2eid").shape, vec![129280, 6]);
        assert!(m.iter().all(|t| t.name != "layers.3.ffn.gate.tid2eid"));
        assert!(m
            .iter()
            .all(|t| !t.name.starts_with("layers.0.attn.compressor")));
        assert_eq!(
            find("layers.2.attn.indexer.compressor.ape").shape,
            vec![4, 256]
        );
        assert_eq!(find("layers.3.attn.compressor.ape").shape, vec![128, 512]);
        assert_eq!(find("layers.0.hc_attn_fn").shape, vec![24, 16384]);
    }
}
