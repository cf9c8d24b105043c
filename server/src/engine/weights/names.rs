//! transformers tensor names -> the official DeepSeek names we use everywhere.
//!
//! The reverse of transformers' `conversion_mapping.py` for `deepseek_v4` (module names under
//! `model.`, `lm_head`), including its merge of the routed experts:
//! `gate_up_proj` [E, 2I, H] = per expert `cat([w1, w3], dim 0)`, `down_proj` [E, H, I] = `w2`.
//! Names that are not transformers names (official checkpoints, `mtp.*`) pass through unchanged.

/// Where a stored tensor goes under official names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mapped {
    /// One official tensor.
    One(String),
    /// Merged `gate_up_proj` [E, 2I, H]: splits into `{prefix}.{e}.w1.weight` (rows 0..I) and
    /// `{prefix}.{e}.w3.weight` (rows I..2I).
    GateUp { prefix: String },
    /// Merged `down_proj` [E, H, I]: splits into `{prefix}.{e}.w2.weight`.
    Down { prefix: String },
}

/// `None` when `name` is not a transformers name (already official).
pub(crate) fn hf_to_official(name: &str) -> Option<Mapped> {
    if let Some(rest) = name.strip_prefix("lm_head.") {
        return Some(Mapped::One(format!("head.{}", leaf(rest))));
    }
    let rest = name.strip_prefix("model.")?;
    let top = match rest {
        "embed_tokens.weight" => Some("embed.weight"),
        "norm.weight" => Some("norm.weight"),
        "hc_head.hc_fn" => Some("hc_head_fn"),
        "hc_head.hc_base" => Some("hc_head_base"),
        "hc_head.hc_scale" => Some("hc_head_scale"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(Mapped::One(t.to_string()));
    }
    let after = rest.strip_prefix("layers.")?;
    let (idx, local) = after.split_once('.')?;
    if idx.parse::<usize>().is_err() {
        return None;
    }
    let layer = format!("layers.{idx}");
    match local {
        "mlp.experts.gate_up_proj" => {
            return Some(Mapped::GateUp {
                prefix: format!("{layer}.ffn.experts"),
            })
        }
        "mlp.experts.down_proj" => {
            return Some(Mapped::Down {
                prefix: format!("{layer}.ffn.experts"),
            })
        }
        _ => {}
    }
    map_layer_local(local).map(|l| Mapped::One(format!("{layer}.{l}")))
}

/// `weight_scale_inv` (transformers' FP8 scale name) -> `scale`.
fn leaf(s: &str) -> String {
    match s.strip_suffix("weight_scale_inv") {
        Some(head) => format!("{head}scale"),
        None => s.to_string(),
    }
}

/// Ordered (transformers prefix, official prefix) rules inside one decoder layer; the first
/// matching prefix wins, so the longer compressor/indexer prefixes come first.
const LAYER_RULES: &[(&str, &str)] = &[
    ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "ffn_norm."),
    ("attn_hc.fn", "hc_attn_fn"),
    ("attn_hc.base", "hc_attn_base"),
    ("attn_hc.scale", "hc_attn_scale"),
    ("ffn_hc.fn", "hc_ffn_fn"),
    ("ffn_hc.base", "hc_ffn_base"),
    ("ffn_hc.scale", "hc_ffn_scale"),
    (
        "self_attn.compressor.indexer.kv_proj.",
        "attn.indexer.compressor.wkv.",
    ),
    (
        "self_attn.compressor.indexer.gate_proj.",
        "attn.indexer.compressor.wgate.",
    ),
    (
        "self_attn.compressor.indexer.position_bias",
        "attn.indexer.compressor.ape",
    ),
    (
        "self_attn.compressor.indexer.kv_norm.",
        "attn.indexer.compressor.norm.",
    ),
    (
        "self_attn.compressor.indexer.q_b_proj.",
        "attn.indexer.wq_b.",
    ),
    (
        "self_attn.compressor.indexer.scorer.weights_proj.",
        "attn.indexer.weights_proj.",
    ),
    ("self_attn.compressor.kv_proj.", "attn.compressor.wkv."),
    ("self_attn.compressor.gate_proj.", "attn.compressor.wgate."),
    ("self_attn.compressor.position_bias", "attn.compressor.ape"),
    ("self_attn.compressor.kv_norm.", "attn.compressor.norm."),
    ("self_attn.sinks", "attn.attn_sink"),
    ("self_attn.q_a_proj.", "attn.wq_a."),
    ("self_attn.q_b_proj.", "attn.wq_b."),
    ("self_attn.kv_proj.", "attn.wkv."),
    ("self_attn.o_a_proj.", "attn.wo_a."),
    ("self_attn.o_b_proj.", "attn.wo_b."),
    ("self_attn.q_a_norm.", "attn.q_norm."),
    ("self_attn.kv_norm.", "attn.kv_norm."),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.gate.", "ffn.gate."),
    ("mlp.shared_experts.gate_proj.", "ffn.shared_experts.w1."),
    ("mlp.shared_experts.up_proj.", "ffn.shared_experts.w3."),
    ("mlp.shared_experts.down_proj.", "ffn.shared_experts.w2."),
];

fn map_layer_local(local: &str) -> Option<String> {
    LAYER_RULES.iter().find_map(|(from, to)| {
        local
            .strip_prefix(from)
            .map(|rest| format!("{to}{}", leaf(rest)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Option<Mapped> {
        Some(Mapped::One(s.to_string()))
    }

    #[test]
    fn maps_the_documented_renames() {
        let cases = [
            ("model.embed_tokens.weight", "embed.weight"),
            ("lm_head.weight", "head.weight"),
            ("model.norm.weight", "norm.weight"),
            ("model.hc_head.hc_fn", "hc_head_fn"),
            (
                "model.layers.3.self_attn.q_a_proj.weight",
                "layers.3.attn.wq_a.weight",
            ),
            (
                "model.layers.3.self_attn.q_b_proj.weight_scale_inv",
                "layers.3.attn.wq_b.scale",
            ),
            ("model.layers.3.self_attn.sinks", "layers.3.attn.attn_sink"),
            (
                "model.layers.2.self_attn.compressor.indexer.scorer.weights_proj.weight",
                "layers.2.attn.indexer.weights_proj.weight",
            ),
            (
                "model.layers.2.self_attn.compressor.indexer.position_bias",
                "layers.2.attn.indexer.compressor.ape",
            ),
            (
                "model.layers.2.self_attn.compressor.kv_norm.weight",
                "layers.2.attn.compressor.norm.weight",
            ),
            (
                "model.layers.0.mlp.gate.tid2eid",
                "layers.0.ffn.gate.tid2eid",
            ),
            (
                "model.layers.4.mlp.gate.e_score_correction_bias",
                "layers.4.ffn.gate.bias",
            ),
            (
                "model.layers.4.mlp.shared_experts.up_proj.weight",
                "layers.4.ffn.shared_experts.w3.weight",
            ),
            ("model.layers.4.ffn_hc.scale", "layers.4.hc_ffn_scale"),
        ];
        for (hf, official) in cases {
            assert_eq!(hf_to_official(hf), one(official), "{hf}");
        }
        assert_eq!(
            hf_to_official("model.layers.7.mlp.experts.gate_up_proj"),
            Some(Mapped::GateUp {
                prefix: "layers.7.ffn.experts".into()
            })
        );
        assert_eq!(hf_to_official("mtp.0.attn.wq_a.weight"), None);
        assert_eq!(hf_to_official("layers.0.attn.wq_a.weight"), None);
    }
}
