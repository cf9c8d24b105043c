//! The Hugging Face `config.json` of a DeepSeek-V4 checkpoint, resolved the way transformers 5.17
//! `DeepseekV4Config` resolves it (legacy fields folded in, defaults applied).
//!
//! Every field is read explicitly so that a bad value is reported with the field's name.

use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("config.json is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config.json: field `{field}`: {reason}")]
    Field { field: String, reason: String },
    #[error("config.json: model_type `{0}` is not supported (expected `deepseek_v4`)")]
    UnsupportedModelType(String),
}

fn field_err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Attention schedule of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionKind {
    /// Sliding window only (plain RoPE, `rope_theta`).
    Sliding,
    /// Compressed sparse attention: overlapping windows of `2 * ratio` with stride `ratio`,
    /// Lightning Indexer top-k over the compressed rows.
    Csa,
    /// Heavily compressed attention: one row per `ratio` tokens, all rows attended.
    Hca,
}

impl AttentionKind {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "sliding_attention" => Some(Self::Sliding),
            "compressed_sparse_attention" => Some(Self::Csa),
            "heavily_compressed_attention" => Some(Self::Hca),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Sliding => "sliding_attention",
            Self::Csa => "compressed_sparse_attention",
            Self::Hca => "heavily_compressed_attention",
        }
    }
}

/// MoE routing of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// Experts chosen by the frozen `tid2eid[token]` table.
    HashMoe,
    /// Experts chosen by top-k of `score + e_score_correction_bias`.
    Moe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    SqrtSoftplus,
    Sigmoid,
}

/// Parameters of one rotary table (`main` for sliding layers, `compress` for CSA/HCA).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    pub theta: f64,
    /// `None` = plain RoPE.
    pub yarn: Option<YarnParams>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct YarnParams {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Multiplies cos/sin. transformers forces 1.0 for V4's compress rope unless given.
    pub attention_factor: f64,
}

/// `quantization_config` of the official checkpoint (FP8 e4m3 with block scales).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantConfig {
    pub quant_method: String,
    pub fmt: String,
    pub weight_block_size: [usize; 2],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertDtype {
    /// Routed experts stored like the other linear weights.
    Default,
    /// FP4 e2m1, one ue8m0 scale per 32 values along K.
    Fp4,
}

/// DSpark draft fields (the draft itself lives in `engine::draft`).
#[derive(Debug, Clone, PartialEq)]
pub struct DsparkConfig {
    pub block_size: usize,
    pub noise_token_id: u32,
    pub target_layer_ids: Vec<usize>,
    pub markov_rank: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Trailing channels of each head that get RoPE (`head_dim * partial_rotary_factor`).
    pub qk_rope_head_dim: usize,
    pub q_lora_rank: usize,
    pub num_experts_per_tok: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub scoring_func: ScoringFunc,
    /// Read for completeness; transformers always renormalises the top-k weights.
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    pub max_position_embeddings: usize,
    pub rope_main: RopeParams,
    pub rope_compress: RopeParams,
    pub layer_types: Vec<AttentionKind>,
    pub compress_rate_csa: usize,
    pub compress_rate_hca: usize,
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub mlp_layer_types: Vec<MlpKind>,
    pub swiglu_limit: f32,
    pub sliding_window: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub num_nextn_predict_layers: usize,
    pub rms_norm_eps: f32,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
    pub quantization: Option<QuantConfig>,
    pub expert_dtype: ExpertDtype,
    pub dspark: Option<DsparkConfig>,
}

/// Typed reads from the JSON object, each error naming its field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        match self.obj.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        self.get(key).map(|v| as_usize(key, v)).transpose()
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| field_err(key, format!("expected a number, got {v}")))
            })
            .transpose()
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| field_err(key, format!("expected true or false, got {v}"))),
        }
    }
    fn str_opt(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| field_err(key, format!("expected a string, got {v}")))
            })
            .transpose()
    }
    fn array_opt(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .ok_or_else(|| field_err(key, format!("expected a list, got {v}")))
            })
            .transpose()
    }
}

fn as_usize(key: &str, v: &Value) -> Result<usize, ConfigError> {
    if let Some(u) = v.as_u64() {
        return usize::try_from(u).map_err(|_| field_err(key, "value too large"));
    }
    // Some configs write integers as floats (e.g. `4.0`).
    match v.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Ok(f as usize),
        _ => Err(field_err(
            key,
            format!("expected a non-negative integer, got {v}"),
        )),
    }
}

fn as_token_id(key: &str, v: &Value) -> Result<u32, ConfigError> {
    let u = as_usize(key, v)?;
    u32::try_from(u).map_err(|_| field_err(key, "token id too large"))
}

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text)?;
        Self::from_json(&value)
    }

    pub fn from_json(value: &Value) -> Result<Self, ConfigError> {
        let obj = value
            .as_object()
            .ok_or_else(|| field_err("<root>", "expected a JSON object"))?;
        let f = Fields { obj };
        match f.str_opt("model_type")? {
            Some("deepseek_v4") => {}
            Some(other) => return Err(ConfigError::UnsupportedModelType(other.to_string())),
            None => return Err(field_err("model_type", "missing (expected `deepseek_v4`)")),
        }

        let num_hidden_layers = f.usize_or("num_hidden_layers", 43)?;
        let n = num_hidden_layers;
        let head_dim = f.usize_or("head_dim", 512)?;
        let hidden_size = f.usize_or("hidden_size", 4096)?;
        let num_attention_heads = f.usize_or("num_attention_heads", 64)?;

        // compress_rates: dict per attention type, legacy scalar overrides folded in.
        let mut compress_rate_csa = 4;
        let mut compress_rate_hca = 128;
        if let Some(v) = f.get("compress_rates") {
            let m = v.as_object().ok_or_else(|| {
                field_err("compress_rates", format!("expected an object, got {v}"))
            })?;
            for (k, rate) in m {
                let field = format!("compress_rates.{k}");
                let rate = as_usize(&field, rate)?;
                match k.as_str() {
                    "compressed_sparse_attention" => compress_rate_csa = rate,
                    "heavily_compressed_attention" => compress_rate_hca = rate,
                    _ => return Err(field_err(&field, "unknown attention type")),
                }
            }
        }
        if let Some(r) = f.usize_opt("compress_rate_csa")? {
            compress_rate_csa = r;
        }
        if let Some(r) = f.usize_opt("compress_rate_hca")? {
            compress_rate_hca = r;
        }
        if compress_rate_csa == 0 {
            return Err(field_err("compress_rates", "CSA rate must be > 0"));
        }
        if compress_rate_hca == 0 {
            return Err(field_err("compress_rates", "HCA rate must be > 0"));
        }

        // layer_types: explicit > legacy compress_ratios > default interleave; cut to n.
        let mut layer_types = if let Some(list) = f.array_opt("layer_types")? {
            list.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().and_then(AttentionKind::parse).ok_or_else(|| {
                        field_err(
                            &format!("layer_types[{i}]"),
                            format!(
                                "expected one of sliding_attention, compressed_sparse_attention, \
                                 heavily_compressed_attention; got {v}"
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else if let Some(list) = f.array_opt("compress_ratios")? {
            list.iter()
                .enumerate()
                .map(|(i, v)| {
                    let key = format!("compress_ratios[{i}]");
                    match as_usize(&key, v)? {
                        0 => Ok(AttentionKind::Sliding),
                        4 => Ok(AttentionKind::Csa),
                        128 => Ok(AttentionKind::Hca),
                        r => Err(field_err(
                            &key,
                            format!("ratio {r} is not one of 0, 4, 128"),
                        )),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            let mut v = vec![AttentionKind::Hca; n.min(2)];
            v.extend((0..n.saturating_sub(2)).map(|i| {
                if i % 2 == 1 {
                    AttentionKind::Csa
                } else {
                    AttentionKind::Hca
                }
            }));
            v
        };
        // A legacy list carries one extra entry for the MTP layer; transformers truncates.
        layer_types.truncate(n);
        if layer_types.len() != n {
            return Err(field_err(
                "layer_types",
                format!(
                    "has {} entries, num_hidden_layers is {n}",
                    layer_types.len()
                ),
            ));
        }

        let mut mlp_layer_types = if let Some(list) = f.array_opt("mlp_layer_types")? {
            list.iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    Some("hash_moe") => Ok(MlpKind::HashMoe),
                    Some("moe") => Ok(MlpKind::Moe),
                    _ => Err(field_err(
                        &format!("mlp_layer_types[{i}]"),
                        format!("expected hash_moe or moe, got {v}"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            let n_hash = f.usize_or("num_hash_layers", 3)?;
            let mut v = vec![MlpKind::HashMoe; n.min(n_hash)];
            v.extend(std::iter::repeat_n(MlpKind::Moe, n.saturating_sub(n_hash)));
            v
        };
        mlp_layer_types.truncate(n);
        if mlp_layer_types.len() != n {
            return Err(field_err(
                "mlp_layer_types",
                format!(
                    "has {} entries, num_hidden_layers is {n}",
                    mlp_layer_types.len()
                ),
            ));
        }

        // partial_rotary_factor: explicit > legacy qk_rope_head_dim / head_dim > 64 / 512.
        let partial_rotary_factor = match f.f64_opt("partial_rotary_factor")? {
            Some(p) => p,
            None => match f.usize_opt("qk_rope_head_dim")? {
                Some(r) => r as f64 / head_dim as f64,
                None => 64.0 / 512.0,
            },
        };
        let qk_rope_head_dim = (head_dim as f64 * partial_rotary_factor) as usize;
        if !qk_rope_head_dim.is_multiple_of(2)
            || qk_rope_head_dim > head_dim
            || qk_rope_head_dim == 0
        {
            return Err(field_err(
                "partial_rotary_factor",
                format!("gives {qk_rope_head_dim} rotary dims of head_dim {head_dim}"),
            ));
        }

        let rope_theta = f.f64_or("rope_theta", 10000.0)?;
        let compress_rope_theta = f.f64_or("compress_rope_theta", 160000.0)?;
        let max_position_embeddings = f.usize_or("max_position_embeddings", 1_048_576)?;
        let (rope_main, rope_compress) = parse_rope(
            &f,
            rope_theta,
            compress_rope_theta,
            max_position_embeddings as f64,
        )?;

        let scoring_func = match f.str_opt("scoring_func")?.unwrap_or("sqrtsoftplus") {
            "sqrtsoftplus" => ScoringFunc::SqrtSoftplus,
            "sigmoid" => ScoringFunc::Sigmoid,
            other => {
                return Err(field_err(
                    "scoring_func",
                    format!("`{other}` is not supported (sqrtsoftplus, sigmoid)"),
                ))
            }
        };
        if let Some(act) = f.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(field_err(
                    "hidden_act",
                    format!("`{act}`: only silu is supported"),
                ));
            }
        }
        if f.bool_or("attention_bias", false)? {
            return Err(field_err("attention_bias", "true is not supported"));
        }
        if f.bool_or("mlp_bias", false)? {
            return Err(field_err("mlp_bias", "true is not supported"));
        }

        // Absent = transformers' default (bos 0, eos 1); explicit null = none.
        let eos_token_ids = match obj.get("eos_token_id") {
            None => vec![1],
            Some(Value::Null) => vec![],
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| as_token_id("eos_token_id", v))
                .collect::<Result<_, _>>()?,
            Some(v) => vec![as_token_id("eos_token_id", v)?],
        };
        let bos_token_id = match obj.get("bos_token_id") {
            None => Some(0),
            Some(Value::Null) => None,
            Some(v) => Some(as_token_id("bos_token_id", v)?),
        };
        let pad_token_id = match f.get("pad_token_id") {
            None => None,
            Some(v) => Some(as_token_id("pad_token_id", v)?),
        };

        let quantization = match f.get("quantization_config") {
            None => None,
            Some(v) => Some(parse_quant(v)?),
        };
        let expert_dtype = match f.str_opt("expert_dtype")? {
            None => ExpertDtype::Default,
            Some("fp4") => ExpertDtype::Fp4,
            Some("fp8") | Some("bf16") => ExpertDtype::Default,
            Some(other) => {
                return Err(field_err(
                    "expert_dtype",
                    format!("`{other}` is not supported"),
                ))
            }
        };
        let dspark = match f.usize_opt("dspark_block_size")? {
            None => None,
            Some(block_size) => Some(DsparkConfig {
                block_size,
                noise_token_id: f
                    .get("dspark_noise_token_id")
                    .map(|v| as_token_id("dspark_noise_token_id", v))
                    .transpose()?
                    .ok_or_else(|| field_err("dspark_noise_token_id", "missing"))?,
                target_layer_ids: f
                    .array_opt("dspark_target_layer_ids")?
                    .ok_or_else(|| field_err("dspark_target_layer_ids", "missing"))?
                    .iter()
                    .map(|v| as_usize("dspark_target_layer_ids", v))
                    .collect::<Result<_, _>>()?,
                markov_rank: f
                    .usize_opt("dspark_markov_rank")?
                    .ok_or_else(|| field_err("dspark_markov_rank", "missing"))?,
            }),
        };

        let cfg = ModelConfig {
            vocab_size: f.usize_or("vocab_size", 129280)?,
            hidden_size,
            moe_intermediate_size: f.usize_or("moe_intermediate_size", 2048)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: f.usize_or("num_key_value_heads", 1)?,
            head_dim,
            qk_rope_head_dim,
            q_lora_rank: f.usize_or("q_lora_rank", 1024)?,
            num_experts_per_tok: f.usize_or("num_experts_per_tok", 6)?,
            n_routed_experts: f.usize_or("n_routed_experts", 256)?,
            n_shared_experts: f.usize_or("n_shared_experts", 1)?,
            scoring_func,
            norm_topk_prob: f.bool_or("norm_topk_prob", true)?,
            routed_scaling_factor: f.f64_or("routed_scaling_factor", 1.5)? as f32,
            max_position_embeddings,
            rope_main,
            rope_compress,
            layer_types,
            compress_rate_csa,
            compress_rate_hca,
            hc_mult: f.usize_or("hc_mult", 4)?,
            hc_sinkhorn_iters: f.usize_or("hc_sinkhorn_iters", 20)?,
            hc_eps: f.f64_or("hc_eps", 1e-6)? as f32,
            mlp_layer_types,
            swiglu_limit: f.f64_or("swiglu_limit", 10.0)? as f32,
            sliding_window: f.usize_or("sliding_window", 128)?,
            o_groups: f.usize_or("o_groups", 8)?,
            o_lora_rank: f.usize_or("o_lora_rank", 1024)?,
            index_n_heads: f.usize_or("index_n_heads", 64)?,
            index_head_dim: f.usize_or("index_head_dim", 128)?,
            index_topk: f.usize_or("index_topk", 512)?,
            num_nextn_predict_layers: f.usize_or("num_nextn_predict_layers", 1)?,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            quantization,
            expert_dtype,
            dspark,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Structural checks the forward pass relies on.
    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("head_dim", self.head_dim),
            ("q_lora_rank", self.q_lora_rank),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("n_routed_experts", self.n_routed_experts),
            ("hc_mult", self.hc_mult),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters),
            ("sliding_window", self.sliding_window),
            ("o_groups", self.o_groups),
            ("o_lora_rank", self.o_lora_rank),
            ("index_n_heads", self.index_n_heads),
            ("index_head_dim", self.index_head_dim),
            ("index_topk", self.index_topk),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(field_err(name, "must be > 0"));
            }
        }
        if self.num_key_value_heads != 1 {
            return Err(field_err(
                "num_key_value_heads",
                format!(
                    "DeepSeek-V4 shares one latent KV head; got {}",
                    self.num_key_value_heads
                ),
            ));
        }
        if self.num_experts_per_tok > self.n_routed_experts {
            return Err(field_err(
                "num_experts_per_tok",
                "larger than n_routed_experts",
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.o_groups) {
            return Err(field_err(
                "o_groups",
                format!(
                    "must divide num_attention_heads ({})",
                    self.num_attention_heads
                ),
            ));
        }
        if self.qk_rope_head_dim > self.index_head_dim {
            return Err(field_err(
                "index_head_dim",
                format!("smaller than the rotary dims ({})", self.qk_rope_head_dim),
            ));
        }
        Ok(())
    }

    pub fn compress_ratio(&self, layer: usize) -> Option<usize> {
        match self.layer_types[layer] {
            AttentionKind::Sliding => None,
            AttentionKind::Csa => Some(self.compress_rate_csa),
            AttentionKind::Hca => Some(self.compress_rate_hca),
        }
    }

    /// Tokens per KV block: a multiple of every compress ratio in use (so a compression window
    /// never spans two blocks) and at least the sliding window.
    pub fn default_block_size(&self) -> usize {
        let mut unit = 1usize;
        for l in 0..self.num_hidden_layers {
            if let Some(r) = self.compress_ratio(l) {
                unit = lcm(unit, r);
            }
        }
        unit * self.sliding_window.div_ceil(unit).max(1)
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

fn parse_quant(v: &Value) -> Result<QuantConfig, ConfigError> {
    let obj = v
        .as_object()
        .ok_or_else(|| field_err("quantization_config", "expected an object"))?;
    let f = Fields { obj };
    let quant_method = f.str_opt("quant_method")?.unwrap_or("fp8").to_string();
    if quant_method != "fp8" {
        return Err(field_err(
            "quantization_config.quant_method",
            format!("`{quant_method}` is not supported (fp8)"),
        ));
    }
    let fmt = f.str_opt("fmt")?.unwrap_or("e4m3").to_string();
    let block = match f.array_opt("weight_block_size")? {
        None => [128, 128],
        Some(list) if list.len() == 2 => [
            as_usize("quantization_config.weight_block_size", &list[0])?,
            as_usize("quantization_config.weight_block_size", &list[1])?,
        ],
        Some(_) => {
            return Err(field_err(
                "quantization_config.weight_block_size",
                "expected two integers",
            ))
        }
    };
    Ok(QuantConfig {
        quant_method,
        fmt,
        weight_block_size: block,
    })
}

/// Resolves `rope_parameters` (nested `main`/`compress`, or flat) or legacy `rope_scaling` into
/// the two tables, exactly as `DeepseekV4Config.__post_init__` does.
fn parse_rope(
    f: &Fields<'_>,
    rope_theta: f64,
    compress_rope_theta: f64,
    max_pos: f64,
) -> Result<(RopeParams, RopeParams), ConfigError> {
    let rp = f.get("rope_parameters").or_else(|| f.get("rope_scaling"));
    let key = if f.get("rope_parameters").is_some() {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let rp = match rp {
        None => None,
        Some(v) => Some(
            v.as_object()
                .ok_or_else(|| field_err(key, format!("expected an object, got {v}")))?,
        ),
    };
    let nested = rp.is_some_and(|m| {
        m.get("main").is_some_and(Value::is_object)
            && m.get("compress").is_some_and(Value::is_object)
    });
    if let (true, Some(m)) = (nested, rp) {
        let main = m.get("main").and_then(Value::as_object);
        let compress = m.get("compress").and_then(Value::as_object);
        let (Some(main), Some(compress)) = (main, compress) else {
            return Err(field_err(key, "main/compress must be objects"));
        };
        // Nested dicts are taken as written (transformers does not inject attention_factor).
        let main = rope_from_dict(&format!("{key}.main"), main, rope_theta, max_pos, None)?;
        let compress = rope_from_dict(
            &format!("{key}.compress"),
            compress,
            compress_rope_theta,
            max_pos,
            None,
        )?;
        return Ok((main, compress));
    }
    let main = RopeParams {
        theta: rope_theta,
        yarn: None,
    };
    let empty = Map::new();
    let flat = rp.unwrap_or(&empty);
    let mut compress_dict = flat.clone();
    compress_dict.insert("rope_theta".into(), Value::from(compress_rope_theta));
    let compress = rope_from_dict(key, &compress_dict, compress_rope_theta, max_pos, Some(1.0))?;
    Ok((main, compress))
}

fn rope_from_dict(
    key: &str,
    m: &Map<String, Value>,
    default_theta: f64,
    max_pos: f64,
    default_attention_factor: Option<f64>,
) -> Result<RopeParams, ConfigError> {
    let f = Fields { obj: m };
    let theta = f.f64_or("rope_theta", default_theta)?;
    let rope_type = match f.str_opt("rope_type")? {
        Some(t) => t,
        None => f.str_opt("type")?.unwrap_or("default"),
    };
    let yarn = match rope_type {
        "default" => None,
        "yarn" => {
            let factor = f
                .f64_opt("factor")
                .map_err(|e| rename(e, key))?
                .ok_or_else(|| field_err(&format!("{key}.factor"), "missing for yarn"))?;
            let original = f.f64_or("original_max_position_embeddings", max_pos)?;
            let attention_factor = match f.f64_opt("attention_factor")? {
                Some(a) => a,
                None => match default_attention_factor {
                    Some(a) => a,
                    None => {
                        let mscale = f.f64_opt("mscale")?;
                        let mscale_all_dim = f.f64_opt("mscale_all_dim")?;
                        match (mscale, mscale_all_dim) {
                            (Some(a), Some(b)) if a != 0.0 && b != 0.0 => {
                                yarn_mscale(factor, a) / yarn_mscale(factor, b)
                            }
                            _ => yarn_mscale(factor, 1.0),
                        }
                    }
                },
            };
            // `or` semantics of transformers: a 0 / missing beta falls back to the default.
            let beta_fast = f
                .f64_opt("beta_fast")?
                .filter(|b| *b != 0.0)
                .unwrap_or(32.0);
            let beta_slow = f.f64_opt("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0);
            Some(YarnParams {
                factor,
                original_max_position_embeddings: original,
                beta_fast,
                beta_slow,
                attention_factor,
            })
        }
        other => {
            return Err(field_err(
                &format!("{key}.rope_type"),
                format!("`{other}` is not supported (default, yarn)"),
            ))
        }
    };
    Ok(RopeParams { theta, yarn })
}

fn rename(e: ConfigError, key: &str) -> ConfigError {
    match e {
        ConfigError::Field { field, reason } => field_err(&format!("{key}.{field}"), reason),
        other => other,
    }
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// V4-Flash's `compress_ratios`: two sliding layers, then CSA (4) / HCA (128) alternating,
    /// a last CSA layer, and the MTP slot (0).
    pub(crate) fn flash_compress_ratios() -> Vec<usize> {
        let mut ratios = vec![0, 0];
        for _ in 0..20 {
            ratios.extend([4, 128]);
        }
        ratios.extend([4, 0]);
        ratios
    }

    fn flash_like() -> Value {
        json!({
            "model_type": "deepseek_v4",
            "compress_ratios": flash_compress_ratios(),
            "num_hash_layers": 3,
            "qk_rope_head_dim": 64,
            "rope_theta": 10000,
            "compress_rope_theta": 160000,
            "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                             "beta_fast": 32, "beta_slow": 1},
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
            "expert_dtype": "fp4",
            "dspark_block_size": 5, "dspark_noise_token_id": 128799,
            "dspark_target_layer_ids": [40, 41, 42], "dspark_markov_rank": 256
        })
    }

    #[test]
    fn legacy_fields_fold_in_like_transformers() {
        let c = ModelConfig::from_json(&flash_like()).unwrap();
        assert_eq!(c.layer_types.len(), 43);
        assert_eq!(c.layer_types[0], AttentionKind::Sliding);
        assert_eq!(c.layer_types[2], AttentionKind::Csa);
        assert_eq!(c.layer_types[3], AttentionKind::Hca);
        assert_eq!(c.layer_types[42], AttentionKind::Csa);
        assert_eq!(c.mlp_layer_types[2], MlpKind::HashMoe);
        assert_eq!(c.mlp_layer_types[3], MlpKind::Moe);
        assert_eq!(c.qk_rope_head_dim, 64);
        assert_eq!(c.rope_main.yarn, None);
        let y = c.rope_compress.yarn.clone().unwrap();
        assert_eq!(y.factor, 16.0);
        assert_eq!(y.attention_factor, 1.0);
        assert_eq!(c.rope_compress.theta, 160000.0);
        assert_eq!(c.expert_dtype, ExpertDtype::Fp4);
        assert_eq!(c.default_block_size(), 128);
        assert_eq!(c.dspark.unwrap().target_layer_ids, vec![40, 41, 42]);
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = ModelConfig::from_json(&json!({"model_type": "deepseek_v4"})).unwrap();
        // Default schedule: 2x HCA then alternating HCA / CSA.
        assert_eq!(c.layer_types[0], AttentionKind::Hca);
        assert_eq!(c.layer_types[2], AttentionKind::Hca);
        assert_eq!(c.layer_types[3], AttentionKind::Csa);
        // No rope scaling given: compress rope is plain RoPE at compress_rope_theta.
        assert_eq!(c.rope_compress.yarn, None);
        assert_eq!(c.eos_token_ids, vec![1]);
    }

    #[test]
    fn unknown_model_type_is_rejected() {
        let e = ModelConfig::from_json(&json!({"model_type": "llama"})).unwrap_err();
        assert!(e.to_string().contains("llama"), "{e}");
        let e = ModelConfig::from_json(&json!({})).unwrap_err();
        assert!(e.to_string().contains("model_type"), "{e}");
    }

    #[test]
    fn bad_fields_are_named() {
        let mut v = flash_like();
        v["hidden_size"] = json!("big");
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("`hidden_size`"), "{e}");

        let mut v = flash_like();
        v["compress_ratios"][5] = json!(7);
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("compress_ratios[5]"), "{e}");

        let mut v = flash_like();
        v["layer_types"] = json!(["sliding_attention"]);
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("layer_types"), "{e}");

        let mut v = flash_like();
        v["scoring_func"] = json!("softmax");
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("scoring_func"), "{e}");

        let mut v = flash_like();
        v["num_key_value_heads"] = json!(8);
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
    }

    #[test]
    fn nested_rope_parameters_are_read_as_written() {
        let v = json!({
            "model_type": "deepseek_v4",
            "rope_parameters": {
                "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.125},
                "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64, "attention_factor": 1.0,
                             "partial_rotary_factor": 0.125}
            }
        });
        let c = ModelConfig::from_json(&v).unwrap();
        let y = c.rope_compress.yarn.unwrap();
        assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 64.0));
        assert_eq!(c.rope_main.theta, 10000.0);
    }
}
