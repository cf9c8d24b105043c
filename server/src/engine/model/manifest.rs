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

/// How the checkpoint stores the dense projections: FP8 blocks when quantized, else BF16.
pub fn linear_dtype(cfg: &ModelConfig) -> StoredDtype {
    if cfg.quantization.is_some() {
        StoredDtype::Fp8Block
    } else {
        StoredDtype::Bf16
    }
}

/// Every target-model tensor of the checkpoint described by `cfg`.
pub fn target_tensors(cfg: &ModelConfig) -> Vec<ExpectedTensor> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = vec![ExpectedTensor {
        name: "embed.weight".into(),
        shape: vec![v, h],
        dtype: StoredDtype::Bf16,
    }];
    for l in 0..cfg.num_hidden_layers {
        out.extend(layer_tensors(
            cfg,
            &format!("layers.{l}"),
            cfg.layer_types[l],
            cfg.mlp_layer_types[l],
        ));
    }
    out.extend(head_tensors(cfg, ""));
    if !cfg.tie_word_embeddings {
        out.push(ExpectedTensor {
            name: "head.weight".into(),
            shape: vec![v, h],
            dtype: StoredDtype::Bf16,
        });
    }
    out
}

/// The tensors of one block under `p` (`layers.3`, or `mtp.0` for a DSpark stage): norms,
/// hyper-connections, attention of kind `attn`, MoE of kind `mlp`.
pub fn layer_tensors(
    cfg: &ModelConfig,
    p: &str,
    attn: AttentionKind,
    mlp: MlpKind,
) -> Vec<ExpectedTensor> {
    let linear = linear_dtype(cfg);
    let expert_dt = match (cfg.expert_dtype, cfg.quantization.is_some()) {
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
    match attn {
        AttentionKind::Sliding => {}
        AttentionKind::Hca => compressor(format!("{a}.compressor"), hd, 1, cfg.compress_rate_hca),
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
    match mlp {
        MlpKind::HashMoe => push(
            format!("{f}.gate.tid2eid"),
            vec![v, cfg.num_experts_per_tok],
            I64,
        ),
        MlpKind::Moe => push(format!("{f}.gate.bias"), vec![e], F32),
    }
    // Routed and shared experts hold the same three projections.
    let mut expert = |prefix: String, dtype: StoredDtype| {
        push(format!("{prefix}.w1.weight"), vec![inter, h], dtype);
        push(format!("{prefix}.w3.weight"), vec![inter, h], dtype);
        push(format!("{prefix}.w2.weight"), vec![h, inter], dtype);
    };
    for x in 0..e {
        expert(format!("{f}.experts.{x}"), expert_dt);
    }
    expert(format!("{f}.shared_experts"), linear);
    out
}

/// The final norm and hyper-connection head, names prefixed by `prefix` (empty for the
/// target, `mtp.2.` for the last DSpark stage).
pub fn head_tensors(cfg: &ModelConfig, prefix: &str) -> Vec<ExpectedTensor> {
    let (h, hc) = (cfg.hidden_size, cfg.hc_mult);
    use StoredDtype::{Bf16, F32};
    [
        ("norm.weight", vec![h], Bf16),
        ("hc_head_fn", vec![hc, hc * h], F32),
        ("hc_head_base", vec![hc], F32),
        ("hc_head_scale", vec![1], F32),
    ]
    .into_iter()
    .map(|(name, shape, dtype)| ExpectedTensor {
        name: format!("{prefix}{name}"),
        shape,
        dtype,
    })
    .collect()
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
    use crate::engine::model::config::tests::flash_compress_ratios;

    #[test]
    fn flash_manifest_counts() {
        let cfg = ModelConfig::from_json(&serde_json::json!({
            "model_type": "deepseek_v4", "compress_ratios": flash_compress_ratios(),
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
