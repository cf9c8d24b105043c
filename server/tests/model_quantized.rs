//! The engine on checkpoints in the real DeepSeek-V4-Flash formats (issue 3).
//!
//! - `tiny-dsv4-quant/`: official tensor names, FP8 e4m3 + E8M0 128x128 block scales for the
//!   attention / indexer / shared-expert projections, FP4 e2m1 routed experts. Loaded through
//!   `model::load_cpu` (the server's path) and compared with transformers' float32 logits on the
//!   dequantized weights (`reference_quant.json`), with the metric and bound of model_fixtures.rs
//!   (support/reference.rs).
//! - `v4-flash-config.json`: the real V4-Flash config (legacy `compress_ratios` form); its
//!   `--load-format dummy` checkpoint is built and checked tensor by tensor, never run.

mod support;

use dspark_server::backend::cpu::CpuBackend;
use dspark_server::engine::model::config::{
    AttentionKind, ExpertDtype, MlpKind, ScoringFunc, YarnParams,
};
use dspark_server::engine::model::{
    self, DeepseekV4, LoadOptions, ModelConfig, Shard, WeightSource,
};
use dspark_server::engine::weights::{Checkpoint, DType, WeightFormat};
use dspark_server::ranks::{Communicator, SingleRank};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use support::reference::{blocks_for, ids, max_rel_diff, prefill_then_decode, Reference};

const PROMPTS: [&str; 3] = ["short", "chat", "long"];
/// TP=N against TP=1, as model_fixtures.rs bounds it (only the summation order differs).
const TP_BOUND: f64 = 1e-5;

fn quant_dir() -> PathBuf {
    support::repo_path("tests/fixtures/tiny-dsv4-quant")
}

fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| Reference::load(&support::repo_path("tests/fixtures/reference_quant.json")))
}

fn load_quant(
    pool_tokens: usize,
    shard: Shard,
    comm: Arc<dyn Communicator>,
) -> DeepseekV4<CpuBackend> {
    let opts = LoadOptions {
        kv_pool_tokens: pool_tokens,
        shard,
        ..LoadOptions::default()
    };
    model::load_cpu(&quant_dir(), &opts, comm).unwrap()
}

fn quant_model(pool_tokens: usize) -> DeepseekV4<CpuBackend> {
    load_quant(pool_tokens, Shard::SINGLE, Arc::new(SingleRank))
}

#[test]
fn fixture_is_stored_in_the_real_formats() {
    // Guards the premise of the tests below: what the engine reads here is really FP8 / FP4.
    let ckpt = Checkpoint::open(&quant_dir()).unwrap();
    let cfg = ModelConfig::from_dir(&quant_dir()).unwrap();
    assert_eq!(cfg.expert_dtype, ExpertDtype::Fp4);
    assert_eq!(
        cfg.quantization.as_ref().unwrap().weight_block_size,
        [128, 128]
    );
    let fp8 = Some(WeightFormat::Fp8Block { block: [128, 128] });
    let fp4 = Some(WeightFormat::Fp4 { group: 32 });
    for l in 0..cfg.num_hidden_layers {
        for w in ["wq_a", "wq_b", "wkv", "wo_a", "wo_b"] {
            let name = format!("layers.{l}.attn.{w}.weight");
            assert_eq!(ckpt.format(&name), fp8, "{name}");
        }
        for w in ["w1", "w2", "w3"] {
            let name = format!("layers.{l}.ffn.shared_experts.{w}.weight");
            assert_eq!(ckpt.format(&name), fp8, "{name}");
            for e in 0..cfg.n_routed_experts {
                let name = format!("layers.{l}.ffn.experts.{e}.{w}.weight");
                assert_eq!(ckpt.format(&name), fp4, "{name}");
            }
        }
        if cfg.layer_types[l] == AttentionKind::Csa {
            let name = format!("layers.{l}.attn.indexer.wq_b.weight");
            assert_eq!(ckpt.format(&name), fp8, "{name}");
        }
    }
    // Official names only: nothing for transformers' renaming to do.
    assert!(ckpt.names().iter().all(|n| !n.starts_with("model.")));
}

#[test]
fn prefill_logits_match_transformers_on_dequantized_weights() {
    let worst = reference().check_prefill(&mut quant_model(1024), &PROMPTS);
    eprintln!("quantized checkpoint: worst relative prefill logit error {worst:e}");
}

#[test]
fn one_shot_prefill_matches_transformers_on_dequantized_weights() {
    let worst = reference().check_one_shot_prefill(&mut quant_model(512), &PROMPTS);
    eprintln!("quantized checkpoint: worst relative one-shot prefill logit error {worst:e}");
}

#[test]
fn greedy_continuations_match_token_for_token() {
    let worst = reference().check_greedy(&mut quant_model(1024), &PROMPTS);
    eprintln!("quantized checkpoint: worst relative decode-step logit error {worst:e}");
}

#[test]
fn quantized_slices_are_the_slices_of_the_whole_tensor() {
    // Tensor parallelism reads FP8 / FP4 tensors by row and column ranges that cut through
    // scale blocks (FP8 128x128) and groups (FP4 32 along K).
    let ckpt = Checkpoint::open(&quant_dir()).unwrap();
    for name in [
        "layers.1.attn.wq_b.weight",
        "layers.1.attn.wo_b.weight",
        "layers.3.attn.indexer.wq_b.weight",
        "layers.2.ffn.shared_experts.w2.weight",
        "layers.2.ffn.experts.5.w1.weight",
        "layers.2.ffn.experts.5.w2.weight",
    ] {
        let full = ckpt.tensor_f32(name).unwrap();
        let (rows, cols) = (full.shape[0], full.shape[1]);
        for (dim, range) in [
            (0, 0..rows / 2),
            (0, rows / 2..rows),
            (0, 3..rows - 5),
            (1, 0..cols / 2),
            (1, cols / 2..cols),
            (1, 7..cols - 9),
        ] {
            let part = ckpt.tensor_f32_slice(name, dim, range.clone()).unwrap();
            let want: Vec<f32> = (0..rows)
                .flat_map(|r| (0..cols).map(move |c| (r, c)))
                .filter(|&(r, c)| range.contains(if dim == 0 { &r } else { &c }))
                .map(|(r, c)| full.data[r * cols + c])
                .collect();
            assert_eq!(part.data, want, "{name} dim {dim} {range:?}");
        }
    }
}

#[test]
fn tensor_parallel_two_ranks_match_one() {
    // Every rank loads its share of the FP8 / FP4 tensors through `tensor_f32_slice`
    // (wq_b / indexer wq_b rows, wo_a groups, wo_b columns, expert w1/w3 rows and w2 columns
    // cutting the FP4 groups in half), then all-reduces / all-gathers.
    let p = reference().prompt("long");
    let toks = ids(&p["input_ids"]);
    let mut single = quant_model(512);
    let bt = blocks_for(&single, 0, toks.len() + 1);
    let (want_prefill, want_decode) = prefill_then_decode(&mut single, &toks, &bt, 77);
    let results = support::local_group::run_ranks(2, |rank, comm| {
        let shard = Shard {
            rank,
            world_size: 2,
        };
        let mut m = load_quant(512, shard, Arc::new(comm));
        prefill_then_decode(&mut m, &toks, &bt, 77)
    });
    let mut worst: f64 = 0.0;
    for (a, b) in &results {
        assert_eq!(a[0].len(), toks.len());
        for (got, want) in a[0].iter().zip(&want_prefill[0]) {
            worst = worst.max(max_rel_diff(got, want));
        }
        worst = worst.max(max_rel_diff(&b[0][0], &want_decode[0][0]));
    }
    assert!(
        worst < TP_BOUND,
        "TP=2 vs TP=1 relative difference {worst:e}"
    );
    assert_eq!(results[0], results[1], "ranks disagree");
    eprintln!("quantized checkpoint: TP=2 vs TP=1 worst relative difference {worst:e}");
}

#[test]
fn tensor_parallel_shards_read_fp8_and_fp4_by_slice() {
    // What the test above relies on: a rank's load reads the quantized tensors by range.
    struct Recording<'a> {
        inner: &'a Checkpoint,
        slices: std::sync::Mutex<Vec<(String, usize)>>,
    }
    impl model::WeightSource for Recording<'_> {
        fn contains(&self, name: &str) -> bool {
            self.inner.contains(name)
        }
        fn tensor_f32(&self, name: &str) -> Result<model::HostTensor, model::LoadError> {
            model::WeightSource::tensor_f32(self.inner, name)
        }
        fn tensor_f32_slice(
            &self,
            name: &str,
            dim: usize,
            range: std::ops::Range<usize>,
        ) -> Result<model::HostTensor, model::LoadError> {
            self.slices.lock().unwrap().push((name.to_string(), dim));
            model::WeightSource::tensor_f32_slice(self.inner, name, dim, range)
        }
        fn tensor_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>), model::LoadError> {
            model::WeightSource::tensor_i64(self.inner, name)
        }
    }
    let ckpt = Checkpoint::open(&quant_dir()).unwrap();
    let cfg = ModelConfig::from_dir(&quant_dir()).unwrap();
    let rec = Recording {
        inner: &ckpt,
        slices: Default::default(),
    };
    let opts = LoadOptions {
        kv_pool_tokens: 128,
        shard: Shard {
            rank: 1,
            world_size: 2,
        },
        ..LoadOptions::default()
    };
    let comm = support::local_group::group(2).remove(1);
    model::build_cpu(cfg, &rec, &opts, Arc::new(comm)).unwrap();
    let slices = rec.slices.into_inner().unwrap();
    for (name, dim) in [
        ("layers.1.attn.wq_b.weight", 0),
        ("layers.1.attn.wo_a.weight", 0),
        ("layers.1.attn.wo_b.weight", 1),
        ("layers.2.ffn.shared_experts.w1.weight", 0),
        ("layers.2.ffn.shared_experts.w2.weight", 1),
        ("layers.2.ffn.experts.5.w3.weight", 0),
        ("layers.2.ffn.experts.5.w2.weight", 1),
    ] {
        assert!(
            slices.iter().any(|(n, d)| n == name && *d == dim),
            "{name} not read by slice along dim {dim}"
        );
    }
    // Every rank holds all the indexer heads: its weights are read whole.
    for name in [
        "layers.1.attn.indexer.wq_b.weight",
        "layers.1.attn.indexer.weights_proj.weight",
    ] {
        assert!(
            !slices.iter().any(|(n, _)| n == name),
            "{name} read by slice: every rank should hold all the indexer heads"
        );
    }
    let formats: Vec<_> = slices.iter().map(|(n, _)| ckpt.format(n)).collect();
    assert!(formats.contains(&Some(WeightFormat::Fp8Block { block: [128, 128] })));
    assert!(formats.contains(&Some(WeightFormat::Fp4 { group: 32 })));
}

// ---- The real V4-Flash shape: config and `--load-format dummy` manifest (never run). ----

fn flash_config() -> ModelConfig {
    let path = support::repo_path("tests/fixtures/v4-flash-config.json");
    ModelConfig::from_json_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn v4_flash_config_parses_with_the_documented_values() {
    // Every value as /work/shared/MODEL.md states it for V4-Flash.
    let c = flash_config();
    assert_eq!(c.hidden_size, 4096);
    assert_eq!(c.num_hidden_layers, 43);
    assert_eq!(c.num_attention_heads, 64);
    assert_eq!(c.num_key_value_heads, 1);
    assert_eq!(c.head_dim, 512);
    assert_eq!(c.qk_rope_head_dim, 64);
    assert_eq!(c.q_lora_rank, 1024);
    assert_eq!(c.o_lora_rank, 1024);
    assert_eq!(c.o_groups, 8);
    assert_eq!(c.moe_intermediate_size, 2048);
    assert_eq!(c.n_routed_experts, 256);
    assert_eq!(c.n_shared_experts, 1);
    assert_eq!(c.num_experts_per_tok, 6);
    assert_eq!(c.scoring_func, ScoringFunc::SqrtSoftplus);
    assert!(c.norm_topk_prob);
    assert_eq!(c.routed_scaling_factor, 1.5);
    assert_eq!(c.swiglu_limit, 10.0);
    assert_eq!(c.hc_mult, 4);
    assert_eq!(c.hc_sinkhorn_iters, 20);
    assert_eq!(c.hc_eps, 1e-6);
    assert_eq!(c.index_n_heads, 64);
    assert_eq!(c.index_head_dim, 128);
    assert_eq!(c.index_topk, 512);
    assert_eq!(c.sliding_window, 128);
    assert_eq!(c.max_position_embeddings, 1_048_576);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.vocab_size, 129_280);
    assert_eq!(c.bos_token_id, Some(0));
    assert_eq!(c.eos_token_ids, vec![1]);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.expert_dtype, ExpertDtype::Fp4);
    let q = c.quantization.as_ref().unwrap();
    assert_eq!(
        (q.quant_method.as_str(), q.fmt.as_str(), q.weight_block_size),
        ("fp8", "e4m3", [128, 128])
    );

    // Layer schedule: compress_ratios [0,0] + [4,128]*20 + [4,0], the last entry being the
    // MTP layer, which is not a target layer.
    assert_eq!(c.layer_types.len(), 43);
    for (l, kind) in c.layer_types.iter().enumerate() {
        let want = match l {
            0 | 1 => AttentionKind::Sliding,
            42 => AttentionKind::Csa,
            l if l % 2 == 0 => AttentionKind::Csa,
            _ => AttentionKind::Hca,
        };
        assert_eq!(*kind, want, "layer {l}");
    }
    assert_eq!((c.compress_rate_csa, c.compress_rate_hca), (4, 128));
    assert_eq!(c.compress_ratio(0), None);
    assert_eq!(c.compress_ratio(2), Some(4));
    assert_eq!(c.compress_ratio(41), Some(128));
    // num_hash_layers 3.
    for (l, kind) in c.mlp_layer_types.iter().enumerate() {
        let want = if l < 3 {
            MlpKind::HashMoe
        } else {
            MlpKind::Moe
        };
        assert_eq!(*kind, want, "layer {l}");
    }

    // RoPE: plain theta 10000 on sliding layers; theta 160000 + YaRN (factor 16 over 65536,
    // beta 32/1, no attention scaling) on compressed ones.
    assert_eq!(
        (c.rope_main.theta, c.rope_main.yarn.clone()),
        (10000.0, None)
    );
    assert_eq!(c.rope_compress.theta, 160000.0);
    assert_eq!(
        c.rope_compress.yarn,
        Some(YarnParams {
            factor: 16.0,
            original_max_position_embeddings: 65536.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.0,
        })
    );

    let d = c.dspark.as_ref().unwrap();
    assert_eq!(d.block_size, 5);
    assert_eq!(d.noise_token_id, 128_799);
    assert_eq!(d.target_layer_ids, vec![40, 41, 42]);
    assert_eq!(d.markov_rank, 256);
    // Blocks hold whole HCA windows.
    assert_eq!(c.default_block_size(), 128);
}

/// Peak resident memory of this process (`VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[test]
fn v4_flash_dummy_checkpoint_lists_every_tensor_in_its_real_format() {
    let cfg = flash_config();
    let specs = model::tensor_specs(&cfg);
    let ckpt = Checkpoint::dummy(&specs, 11);

    // Every manifest tensor, plus one scale per quantized weight, and nothing else.
    let mut want: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    for s in &specs {
        if matches!(s.dtype, DType::F8E4M3 | DType::I8) {
            want.push(format!("{}.scale", s.name.strip_suffix(".weight").unwrap()));
        }
    }
    want.sort();
    assert_eq!(ckpt.names(), want);
    for s in &specs {
        assert_eq!(ckpt.spec(&s.name), Some(s), "{}", s.name);
    }

    // Independently of the manifest code: MODEL.md's list of the official checkpoint.
    let fp8 = Some(WeightFormat::Fp8Block { block: [128, 128] });
    let fp4 = Some(WeightFormat::Fp4 { group: 32 });
    let check = |name: &str, dtype: DType, shape: &[usize], format: Option<WeightFormat>| {
        let spec = ckpt
            .spec(name)
            .unwrap_or_else(|| panic!("{name} is missing"));
        assert_eq!(
            (spec.dtype, spec.shape.as_slice()),
            (dtype, shape),
            "{name}"
        );
        assert_eq!(ckpt.format(name), format, "{name}");
    };
    let plain = Some(WeightFormat::Plain);
    let (e8m0, bf16, f32_) = (DType::F8E8M0, DType::BF16, DType::F32);
    let quantized_fp8 = |name: &str, rows: usize, cols: usize| {
        check(&format!("{name}.weight"), DType::F8E4M3, &[rows, cols], fp8);
        check(
            &format!("{name}.scale"),
            e8m0,
            &[rows.div_ceil(128), cols.div_ceil(128)],
            plain,
        );
        // Stored bytes: one e4m3 byte per value.
        assert_eq!(
            ckpt.raw(&format!("{name}.weight")).unwrap().1.len(),
            rows * cols
        );
    };
    check("embed.weight", bf16, &[129_280, 4096], plain);
    check("head.weight", bf16, &[129_280, 4096], plain);
    check("norm.weight", bf16, &[4096], plain);
    check("hc_head_fn", f32_, &[4, 4 * 4096], plain);
    check("hc_head_base", f32_, &[4], plain);
    for l in 0..43 {
        let p = format!("layers.{l}");
        quantized_fp8(&format!("{p}.attn.wq_a"), 1024, 4096);
        quantized_fp8(&format!("{p}.attn.wq_b"), 32768, 1024);
        quantized_fp8(&format!("{p}.attn.wkv"), 512, 4096);
        quantized_fp8(&format!("{p}.attn.wo_a"), 8192, 4096);
        quantized_fp8(&format!("{p}.attn.wo_b"), 4096, 8192);
        check(&format!("{p}.attn.attn_sink"), f32_, &[64], plain);
        check(&format!("{p}.attn.q_norm.weight"), bf16, &[1024], plain);
        check(&format!("{p}.attn.kv_norm.weight"), bf16, &[512], plain);
        check(&format!("{p}.attn_norm.weight"), bf16, &[4096], plain);
        check(&format!("{p}.ffn_norm.weight"), bf16, &[4096], plain);
        for site in ["attn", "ffn"] {
            check(&format!("{p}.hc_{site}_fn"), f32_, &[24, 16384], plain);
            check(&format!("{p}.hc_{site}_base"), f32_, &[24], plain);
            check(&format!("{p}.hc_{site}_scale"), f32_, &[3], plain);
        }
        // Compressors on every layer but 0 and 1; the indexer on the ratio-4 layers.
        let compressed = l >= 2;
        let csa = compressed && l % 2 == 0;
        assert_eq!(
            ckpt.contains(&format!("{p}.attn.compressor.wkv.weight")),
            compressed,
            "{p}"
        );
        if compressed {
            let coff = if csa { 2 } else { 1 };
            let ratio = if csa { 4 } else { 128 };
            let c = format!("{p}.attn.compressor");
            check(&format!("{c}.wkv.weight"), bf16, &[coff * 512, 4096], plain);
            check(
                &format!("{c}.wgate.weight"),
                bf16,
                &[coff * 512, 4096],
                plain,
            );
            check(&format!("{c}.ape"), f32_, &[ratio, coff * 512], plain);
            check(&format!("{c}.norm.weight"), bf16, &[512], plain);
        }
        assert_eq!(
            ckpt.contains(&format!("{p}.attn.indexer.wq_b.weight")),
            csa,
            "{p}"
        );
        if csa {
            quantized_fp8(&format!("{p}.attn.indexer.wq_b"), 64 * 128, 1024);
            check(
                &format!("{p}.attn.indexer.weights_proj.weight"),
                bf16,
                &[64, 4096],
                plain,
            );
            let c = format!("{p}.attn.indexer.compressor");
            check(&format!("{c}.wkv.weight"), bf16, &[256, 4096], plain);
            check(&format!("{c}.wgate.weight"), bf16, &[256, 4096], plain);
            check(&format!("{c}.ape"), f32_, &[4, 256], plain);
            check(&format!("{c}.norm.weight"), bf16, &[128], plain);
        }
        check(&format!("{p}.ffn.gate.weight"), bf16, &[256, 4096], plain);
        let hash = l < 3;
        assert_eq!(ckpt.contains(&format!("{p}.ffn.gate.tid2eid")), hash, "{p}");
        assert_eq!(ckpt.contains(&format!("{p}.ffn.gate.bias")), !hash, "{p}");
        if hash {
            check(
                &format!("{p}.ffn.gate.tid2eid"),
                DType::I64,
                &[129_280, 6],
                plain,
            );
        } else {
            check(&format!("{p}.ffn.gate.bias"), f32_, &[256], plain);
        }
        for w in ["w1", "w3", "w2"] {
            let (rows, cols) = if w == "w2" {
                (4096, 2048)
            } else {
                (2048, 4096)
            };
            quantized_fp8(&format!("{p}.ffn.shared_experts.{w}"), rows, cols);
            for e in 0..256 {
                let x = format!("{p}.ffn.experts.{e}.{w}");
                // Logical shape; stored as I8, two e2m1 values per byte, one scale per 32.
                check(&format!("{x}.weight"), DType::I8, &[rows, cols], fp4);
                check(&format!("{x}.scale"), e8m0, &[rows, cols / 32], plain);
                if e == 0 || e == 255 {
                    let stored = ckpt.raw(&format!("{x}.weight")).unwrap().1.len();
                    assert_eq!(stored, rows * cols / 2, "{x}");
                }
            }
        }
    }
    assert!(ckpt.names().iter().all(|n| !n.starts_with("mtp.")));
    // Hash routing tables hold 6 distinct valid expert ids per token.
    let (_, tid2eid) = ckpt.tensor_i64("layers.2.ffn.gate.tid2eid").unwrap();
    for row in tid2eid.chunks(6) {
        assert!(row.iter().all(|e| (0..256).contains(e)), "{row:?}");
        assert!((1..6).all(|i| !row[..i].contains(&row[i])), "{row:?}");
    }

    // Sizes: the sum of the stored bytes, just under the 159.6 GB of the official checkpoint
    // (which also holds the MTP layer).
    let mut bytes = 0u64;
    for name in ckpt.names() {
        bytes += ckpt.raw(&name).unwrap().1.len() as u64;
    }
    assert_eq!(ckpt.total_bytes(), bytes);
    let gb = bytes as f64 / 1e9;
    assert!((150.0..159.6).contains(&gb), "{gb} GB");
    eprintln!(
        "V4-Flash dummy: {} tensors, {gb:.2} GB as stored",
        ckpt.names().len()
    );

    // Dequantized reads work on the windows the dummy hands out (no full-size allocation).
    let t = ckpt
        .tensor_f32_slice("layers.42.ffn.experts.255.w2.weight", 0, 0..2)
        .unwrap();
    assert_eq!(t.shape, vec![2, 2048]);
    assert!(t.data.iter().all(|v| v.is_finite()));
    let t = ckpt
        .tensor_f32_slice("layers.7.attn.wo_a.weight", 1, 3900..4096)
        .unwrap();
    assert!(t.data.iter().all(|v| v.is_finite()) && t.data.iter().any(|v| *v != 0.0));

    // Far below the 160 GB it describes (the largest piece is the 1 GB bf16 embedding pool).
    if let Some(peak) = peak_rss() {
        assert!(peak < 4_000_000_000, "peak RSS {peak} bytes");
        eprintln!("V4-Flash dummy: peak RSS {:.2} GB", peak as f64 / 1e9);
    }
}

#[test]
fn packed_tensors_and_their_slices_decode_to_the_f32_values() {
    // What the CUDA backend uploads (FP8 / FP4 kept packed) must be the same numbers the CPU
    // backend reads widened, for whole tensors and for the tensor-parallel slices that keep
    // scale tiles whole; a slice that cuts a tile is refused (the loader widens it instead).
    let ckpt = Checkpoint::open(&quant_dir()).unwrap();
    type Slice = Option<(usize, std::ops::Range<usize>)>;
    let cases: [(&str, Slice, bool); 8] = [
        ("layers.1.attn.wq_b.weight", None, true),
        ("layers.1.attn.wo_b.weight", None, true),
        ("layers.2.ffn.experts.5.w1.weight", None, true),
        ("layers.2.ffn.experts.5.w2.weight", None, true),
        ("layers.2.ffn.experts.5.w1.weight", Some((0, 16..32)), true),
        ("layers.2.ffn.experts.5.w2.weight", Some((1, 0..16)), false),
        ("layers.1.attn.wq_b.weight", Some((0, 0..64)), false),
        (
            "layers.2.ffn.shared_experts.w2.weight",
            Some((1, 0..16)),
            false,
        ),
    ];
    for (name, slice, packs) in cases {
        let got = WeightSource::packed(&ckpt, name, slice.clone()).unwrap();
        let Some((shape, packed)) = got else {
            assert!(!packs, "{name} {slice:?} was not packed");
            continue;
        };
        assert!(packs, "{name} {slice:?} cuts a scale tile but was packed");
        let want = match slice.clone() {
            None => ckpt.tensor_f32(name).unwrap(),
            Some((dim, r)) => ckpt.tensor_f32_slice(name, dim, r).unwrap(),
        };
        assert_eq!(shape, want.shape, "{name}");
        let values = packed.dequantize(shape[0], shape[1]).unwrap();
        assert_eq!(values, want.data, "{name} {slice:?}");
    }
}
