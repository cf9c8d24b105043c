//! Components of the CPU model against intermediate tensors of transformers 5.17
//! (server/tests/fixtures/components.safetensors, described in components.json).

mod support;

use dspark_server::backend::cpu::CpuBackend;
use dspark_server::backend::Backend;
use dspark_server::engine::model::forward::{
    compress_window, indexer_score, route, router_scores, Window,
};
use dspark_server::engine::model::hyper::{sinkhorn, HyperConnection, HyperHead};
use dspark_server::engine::model::load::Routing;
use dspark_server::engine::model::rope::RopeTable;
use dspark_server::engine::model::{self, LoadOptions, ModelConfig};
use dspark_server::engine::weights::Checkpoint;
use dspark_server::ranks::SingleRank;
use std::sync::Arc;
use support::{f32s, i64s};

fn cfg() -> ModelConfig {
    ModelConfig::from_dir(&support::tiny_dir()).unwrap()
}

fn weights() -> Checkpoint {
    support::tiny_checkpoint()
}

fn components() -> Checkpoint {
    support::components()
}

fn w(src: &Checkpoint, name: &str) -> Vec<f32> {
    f32s(src, name)
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst / scale < tol,
        "{what}: max abs diff {worst:e} (scale {scale})"
    );
}

fn linear(x: &[f32], n: usize, weight: Vec<f32>, rows: usize) -> Vec<f32> {
    let b = CpuBackend;
    let cols = weight.len() / rows;
    let m = b.matrix(rows, cols, weight).unwrap();
    b.linear(x, n, &m).unwrap()
}

#[test]
fn rope_and_yarn_tables_match() {
    let c = components();
    let cfg = cfg();
    let positions: Vec<usize> = i64s(&c, "rope.positions")
        .iter()
        .map(|&p| p as usize)
        .collect();
    let x = f32s(&c, "rope.x");
    let hd = cfg.head_dim;
    for (kind, params) in [("main", &cfg.rope_main), ("compress", &cfg.rope_compress)] {
        let t = RopeTable::new(params, cfg.qk_rope_head_dim);
        assert_close(
            &t.inv_freq,
            &f32s(&c, &format!("rope.{kind}.inv_freq")),
            1e-6,
            kind,
        );
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        let (mut rot, mut unrot) = (Vec::new(), Vec::new());
        for (i, &p) in positions.iter().enumerate() {
            let (c_, s_) = t.cos_sin(p);
            cos.extend(c_);
            sin.extend(s_);
            let mut r = x[i * hd..(i + 1) * hd].to_vec();
            t.apply(&mut r, hd, p, false);
            rot.extend(r);
            let mut u = x[i * hd..(i + 1) * hd].to_vec();
            t.apply(&mut u, hd, p, true);
            unrot.extend(u);
        }
        // Positions reach 2^20: f32 angles there carry ~1e-7 relative rounding of the angle.
        assert_close(&cos, &f32s(&c, &format!("rope.{kind}.cos")), 2e-5, "cos");
        assert_close(&sin, &f32s(&c, &format!("rope.{kind}.sin")), 2e-5, "sin");
        assert_close(
            &rot,
            &f32s(&c, &format!("rope.{kind}.rotated")),
            2e-5,
            "rotated",
        );
        assert_close(
            &unrot,
            &f32s(&c, &format!("rope.{kind}.unrotated")),
            2e-5,
            "unrotated",
        );
    }
}

#[test]
fn sinkhorn_matches() {
    let c = components();
    let cfg = cfg();
    let logits = f32s(&c, "sinkhorn.logits");
    let hc = cfg.hc_mult;
    let got: Vec<f32> = logits
        .chunks(hc * hc)
        .flat_map(|l| sinkhorn(l, hc, cfg.hc_sinkhorn_iters, cfg.hc_eps))
        .collect();
    assert_close(&got, &f32s(&c, "sinkhorn.out"), 1e-6, "sinkhorn");
}

#[test]
fn hyper_connection_and_head_match() {
    let (c, wt, cfg) = (components(), weights(), cfg());
    let (hc, h) = (cfg.hc_mult, cfg.hidden_size);
    let s = w(&wt, "layers.1.hc_attn_scale");
    let site = HyperConnection {
        fn_: w(&wt, "layers.1.hc_attn_fn"),
        base: w(&wt, "layers.1.hc_attn_base"),
        scale: [s[0], s[1], s[2]],
    };
    let input = f32s(&c, "hc.input");
    let (mut post, mut comb, mut collapsed) = (Vec::new(), Vec::new(), Vec::new());
    for t in input.chunks(hc * h) {
        let m = site.mix(t, hc, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps);
        collapsed.extend(model::hyper::collapse(t, &m.pre, h));
        post.extend(m.post);
        comb.extend(m.comb);
    }
    assert_close(&post, &f32s(&c, "hc.post"), 1e-5, "post");
    assert_close(&comb, &f32s(&c, "hc.comb"), 1e-5, "comb");
    assert_close(&collapsed, &f32s(&c, "hc.collapsed"), 1e-5, "collapsed");

    let head = HyperHead {
        fn_: w(&wt, "hc_head_fn"),
        base: w(&wt, "hc_head_base"),
        scale: w(&wt, "hc_head_scale")[0],
    };
    let input = f32s(&c, "hc_head.input");
    let out: Vec<f32> = input
        .chunks(hc * h)
        .flat_map(|t| head.collapse(t, hc, cfg.hc_eps, cfg.rms_norm_eps))
        .collect();
    assert_close(&out, &f32s(&c, "hc_head.output"), 1e-5, "hc_head");
}

#[test]
fn routers_match() {
    let (c, wt, cfg) = (components(), weights(), cfg());
    let (e, k, h) = (
        cfg.n_routed_experts,
        cfg.num_experts_per_tok,
        cfg.hidden_size,
    );
    let ids: Vec<u32> = i64s(&c, "hash_router.input_ids")
        .iter()
        .map(|&i| i as u32)
        .collect();
    for (key, layer) in [("hash_router", 0), ("topk_router", 1)] {
        let x = f32s(&c, &format!("{key}.input"));
        let n = x.len() / h;
        let logits = linear(&x, n, w(&wt, &format!("layers.{layer}.ffn.gate.weight")), e);
        assert_close(&logits, &f32s(&c, &format!("{key}.logits")), 1e-5, key);
        let routing = if layer == 0 {
            let table = i64s(&wt, "layers.0.ffn.gate.tid2eid");
            Routing::Hash(table.iter().map(|&v| v as u32).collect())
        } else {
            Routing::TopK(w(&wt, "layers.1.ffn.gate.bias"))
        };
        let routes = route(
            &router_scores(&logits, cfg.scoring_func),
            e,
            k,
            &routing,
            &ids,
            cfg.routed_scaling_factor,
        );
        let want_idx = i64s(&c, &format!("{key}.indices"));
        let want_w = f32s(&c, &format!("{key}.weights"));
        for (t, r) in routes.iter().enumerate() {
            for j in 0..k {
                let expert = want_idx[t * k + j] as usize;
                let got = r.iter().find(|(x, _)| *x == expert);
                let Some((_, gw)) = got else {
                    panic!("{key}: token {t} should route to expert {expert}, got {r:?}");
                };
                assert!((gw - want_w[t * k + j]).abs() < 1e-5, "{key} weight t{t}");
            }
        }
    }
}

#[test]
fn moe_block_matches() {
    let (c, cfg) = (components(), cfg());
    let dir = support::tiny_dir();
    let src = weights();
    let m = model::build_cpu(
        cfg.clone(),
        &src,
        &LoadOptions::default(),
        Arc::new(SingleRank),
    )
    .unwrap();
    let x = f32s(&c, "moe.input");
    let ids: Vec<u32> = i64s(&c, "hash_router.input_ids")
        .iter()
        .map(|&i| i as u32)
        .collect();
    let _ = dir;
    let out = m.moe(1, &x, &ids).unwrap();
    assert_close(&out, &f32s(&c, "moe.output"), 1e-5, "moe");
}

fn compressed_rows(
    hidden: &[f32],
    wt: &Checkpoint,
    prefix: &str,
    win: Window,
    cfg: &ModelConfig,
) -> Vec<f32> {
    let n = hidden.len() / cfg.hidden_size;
    let width = win.coff * win.dim;
    let kv = linear(hidden, n, w(wt, &format!("{prefix}.wkv.weight")), width);
    let gate = linear(hidden, n, w(wt, &format!("{prefix}.wgate.weight")), width);
    let rows: Vec<Vec<f32>> = (0..n)
        .map(|t| {
            let mut r = kv[t * width..(t + 1) * width].to_vec();
            r.extend_from_slice(&gate[t * width..(t + 1) * width]);
            r
        })
        .collect();
    let rope = RopeTable::new(&cfg.rope_compress, cfg.qk_rope_head_dim);
    let ape = w(wt, &format!("{prefix}.ape"));
    let norm = w(wt, &format!("{prefix}.norm.weight"));
    (0..n / win.ratio)
        .flat_map(|i| {
            compress_window(
                |p| &rows[p][..],
                i,
                &ape,
                &norm,
                win,
                &rope,
                cfg.rms_norm_eps,
            )
        })
        .collect()
}

#[test]
fn csa_and_hca_compressors_match() {
    let (c, wt, cfg) = (components(), weights(), cfg());
    let csa = compressed_rows(
        &f32s(&c, "csa.hidden"),
        &wt,
        "layers.1.attn.compressor",
        Window {
            dim: cfg.head_dim,
            coff: 2,
            ratio: cfg.compress_rate_csa,
            indexer: false,
        },
        &cfg,
    );
    assert_close(&csa, &f32s(&c, "csa.compressed"), 1e-5, "csa");
    let hca = compressed_rows(
        &f32s(&c, "hca.hidden"),
        &wt,
        "layers.2.attn.compressor",
        Window {
            dim: cfg.head_dim,
            coff: 1,
            ratio: cfg.compress_rate_hca,
            indexer: false,
        },
        &cfg,
    );
    assert_close(&hca, &f32s(&c, "hca.compressed"), 1e-5, "hca");
}

#[test]
fn indexer_scores_and_top_k_match() {
    let (c, wt, cfg) = (components(), weights(), cfg());
    let ihd = cfg.index_head_dim;
    let nih = cfg.index_n_heads;
    let hidden = f32s(&c, "csa.hidden");
    let n = hidden.len() / cfg.hidden_size;
    let keys = compressed_rows(
        &hidden,
        &wt,
        "layers.1.attn.indexer.compressor",
        Window {
            dim: ihd,
            coff: 2,
            ratio: cfg.compress_rate_csa,
            indexer: true,
        },
        &cfg,
    );
    let q_res = f32s(&c, "csa.q_residual");
    let mut q = linear(
        &q_res,
        n,
        w(&wt, "layers.1.attn.indexer.wq_b.weight"),
        nih * ihd,
    );
    let rope = RopeTable::new(&cfg.rope_compress, cfg.qk_rope_head_dim);
    for (t, row) in q.chunks_mut(nih * ihd).enumerate() {
        rope.apply(row, ihd, t, false);
    }
    let mut wts = linear(
        &hidden,
        n,
        w(&wt, "layers.1.attn.indexer.weights_proj.weight"),
        nih,
    );
    wts.iter_mut().for_each(|v| *v *= (nih as f32).powf(-0.5));
    let entries = keys.len() / ihd;
    let scale = (ihd as f32).powf(-0.5);
    let scores: Vec<f32> = (0..n)
        .flat_map(|t| {
            let (q, wts, keys) = (&q, &wts, &keys);
            (0..entries).map(move |e| {
                indexer_score(
                    &q[t * nih * ihd..(t + 1) * nih * ihd],
                    &wts[t * nih..(t + 1) * nih],
                    &keys[e * ihd..(e + 1) * ihd],
                    scale,
                )
            })
        })
        .collect();
    let want = f32s(&c, "indexer.scores");
    assert_close(&scores, &want, 1e-5, "indexer scores");

    // Top-k as sets, over the visible rows; a tie at the k-th place makes the reference's pick
    // arbitrary, so such queries only check the rows above the tie.
    let topk = i64s(&c, "indexer.topk");
    let k = cfg.index_topk;
    let mut ties = 0;
    for t in 0..n {
        let visible = (t + 1) / cfg.compress_rate_csa;
        let row = &want[t * entries..t * entries + visible];
        let mut ours = dspark_server::engine::model::ops::top_k_indices(row, k);
        ours.sort();
        let mut theirs: Vec<usize> = topk[t * k..(t + 1) * k]
            .iter()
            .filter(|&&v| v >= 0)
            .map(|&v| v as usize)
            .collect();
        theirs.sort();
        if ours != theirs {
            let mut sorted = row.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let tie = visible > k && sorted[k - 1] == sorted[k];
            assert!(tie, "query {t}: top-k {ours:?} vs reference {theirs:?}");
            ties += 1;
        }
    }
    eprintln!("indexer top-k: {ties} queries decided by exact ties");
}

#[test]
fn captured_target_features_are_stream_means_of_layer_outputs() {
    // The DSpark draft reads the mean of the residual streams after chosen layers.
    let (c, cfg) = (components(), cfg());
    let src = weights();
    let mut m = model::build_cpu(
        cfg.clone(),
        &src,
        &LoadOptions::default(),
        Arc::new(SingleRank),
    )
    .unwrap();
    m.set_capture_layers(vec![0, 1, 2, 3]);
    let text =
        std::fs::read_to_string(support::repo_path("tests/fixtures/reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<u32> = reference["prompts"]["chat"]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    use dspark_server::engine::{LogitsWanted, ModelRunner, SeqPlan, StepPlan};
    m.step(&StepPlan {
        seqs: vec![SeqPlan {
            seq_id: 1,
            start_pos: 0,
            tokens: ids,
            block_table: vec![0],
            recent_table: vec![0],
            logits: LogitsWanted::None,
            draft: None,
        }],
    })
    .unwrap();
    let (hc, h) = (cfg.hc_mult, cfg.hidden_size);
    let captured = m.take_captured();
    assert_eq!(captured.len(), 4);
    for (layer, got) in captured {
        let streams = f32s(&c, &format!("layer_out.{layer}"));
        let want: Vec<f32> = streams
            .chunks(hc * h)
            .flat_map(|t| {
                (0..h).map(move |d| (0..hc).map(|k| t[k * h + d]).sum::<f32>() / hc as f32)
            })
            .collect();
        assert_close(&got, &want, 1e-5, &format!("layer {layer}"));
    }
}
