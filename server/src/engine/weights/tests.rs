//! Tests against the fixtures written by server/tests/fixtures/make_fixtures.py.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;

use super::*;

fn server_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_dir() -> PathBuf {
    server_dir().join("assets/tiny-dsv4")
}

fn fixture(name: &str) -> PathBuf {
    server_dir().join("tests/fixtures").join(name)
}

fn tiny() -> Checkpoint {
    Checkpoint::open(&tiny_dir()).expect("tiny model opens")
}

fn assert_bitwise_eq(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{name}[{i}]: got {g}, want {w}"
        );
    }
}

/// Expected slice of a row-major tensor, computed from the full read.
fn slice_of(full: &HostTensor, dim: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    let shape = &full.shape;
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let mut out = Vec::new();
    for o in 0..outer {
        for i in range.clone() {
            let start = (o * shape[dim] + i) * inner;
            out.extend_from_slice(&full.data[start..start + inner]);
        }
    }
    out
}

#[test]
fn quantized_formats_dequantize_exactly_like_torch() {
    let quant = Checkpoint::open_files(&[fixture("quant.safetensors")]).unwrap();
    let reference = Checkpoint::open_files(&[fixture("quant_ref.safetensors")]).unwrap();
    let names = reference.names();
    assert_eq!(names.len(), 6, "fixture cases: {names:?}");
    for name in names {
        let want = reference.tensor_f32(&name).unwrap();
        let got = quant.tensor_f32(&name).unwrap();
        assert_eq!(got.shape, want.shape, "{name}");
        // Power-of-two scaling of an FP8/FP4 value is exact in f32: no ulp of slack needed.
        assert_bitwise_eq(&name, &got.data, &want.data);
        let spec = quant.spec(&name).unwrap();
        assert_eq!(spec.shape, want.shape, "{name}: logical shape");
        let scale = quant.scale_name(&name).unwrap().to_string();
        assert_eq!(scale, name.replace(".weight", ".scale"));
        match spec.dtype {
            DType::F8E4M3 => {
                assert_eq!(
                    quant.format(&name),
                    Some(WeightFormat::Fp8Block { block: [128, 128] })
                );
                let (_, raw) = quant.raw(&name).unwrap();
                assert_eq!(raw.len(), spec.numel());
            }
            DType::I8 => {
                assert_eq!(quant.format(&name), Some(WeightFormat::Fp4 { group: 32 }));
                let (_, raw) = quant.raw(&name).unwrap();
                assert_eq!(raw.len(), spec.numel() / 2, "{name}: two values per byte");
            }
            other => panic!("{name}: unexpected dtype {other}"),
        }
    }
    // E8M0 scales are raw bytes; the f32-scale variants hold the same powers of two.
    let e8m0 = quant.spec("layers.0.attn.wq_a.scale").unwrap();
    assert_eq!(
        (e8m0.dtype, e8m0.shape.clone()),
        (DType::F8E8M0, vec![2, 3])
    );
    let f32s = quant.spec("layers.1.attn.wq_a.scale").unwrap();
    assert_eq!((f32s.dtype, f32s.shape.clone()), (DType::F32, vec![2, 3]));
    // Ragged FP8 tensor: scale blocks round up.
    assert_eq!(
        quant.spec("layers.0.attn.wkv.scale").unwrap().shape,
        vec![2, 3]
    );
}

#[test]
fn quantized_slices_equal_the_slice_of_the_full_read() {
    let quant = Checkpoint::open_files(&[fixture("quant.safetensors")]).unwrap();
    let cases: &[(&str, usize, std::ops::Range<usize>)] = &[
        ("layers.0.attn.wq_a.weight", 0, 128..256),
        ("layers.0.attn.wq_a.weight", 1, 128..384),
        ("layers.0.attn.wq_a.weight", 1, 5..133), // not block-aligned: still exact
        ("layers.0.attn.wkv.weight", 0, 100..192),
        ("layers.1.attn.wq_a.weight", 0, 0..128),
        ("layers.0.ffn.experts.0.w1.weight", 0, 32..64),
        ("layers.0.ffn.experts.0.w1.weight", 1, 128..256),
        ("layers.0.ffn.experts.0.w1.weight", 1, 33..97), // odd start: high nibble first
        ("layers.1.ffn.experts.0.w1.weight", 1, 0..32),
        ("layers.0.ffn.experts.0.w2.weight", 0, 0..1),
    ];
    for (name, dim, range) in cases {
        let full = quant.tensor_f32(name).unwrap();
        let part = quant.tensor_f32_slice(name, *dim, range.clone()).unwrap();
        let mut shape = full.shape.clone();
        shape[*dim] = range.len();
        assert_eq!(part.shape, shape, "{name} dim {dim}");
        assert_bitwise_eq(name, &part.data, &slice_of(&full, *dim, range.clone()));
    }
}

#[derive(serde::Deserialize)]
struct OfficialTensor {
    shape: Vec<usize>,
    sum: f64,
    first: Vec<f64>,
}

/// Every tensor of `ckpt` other than quantization scales is in the fixture, and vice versa, with
/// the fixture's shape, first values and sum.
fn assert_matches_official(ckpt: &Checkpoint, fixture_json: &str) {
    let text = std::fs::read_to_string(fixture(fixture_json)).unwrap();
    let official: BTreeMap<String, OfficialTensor> = serde_json::from_str(&text).unwrap();
    let expected: BTreeSet<&str> = official.keys().map(String::as_str).collect();
    let names = ckpt.names();
    let scales: BTreeSet<&str> = names.iter().filter_map(|n| ckpt.scale_name(n)).collect();
    let got: BTreeSet<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !scales.contains(n))
        .collect();
    let missing: Vec<_> = expected.difference(&got).collect();
    let extra: Vec<_> = got.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, unexpected {extra:?}"
    );
    for (name, want) in &official {
        let spec = ckpt.spec(name).unwrap();
        assert_eq!(spec.shape, want.shape, "{name}");
        let values: Vec<f64> =
            if spec.dtype.is_integer() && ckpt.format(name) == Some(WeightFormat::Plain) {
                ckpt.tensor_i64(name)
                    .unwrap()
                    .1
                    .into_iter()
                    .map(|v| v as f64)
                    .collect()
            } else {
                let t = ckpt.tensor_f32(name).unwrap();
                t.data.into_iter().map(f64::from).collect()
            };
        // Stored values are f32 at most; compare there (serde_json's default float parsing is
        // not always correctly rounded in the last f64 bit).
        let first: Vec<f32> = values[..want.first.len()]
            .iter()
            .map(|&v| v as f32)
            .collect();
        let want_first: Vec<f32> = want.first.iter().map(|&v| v as f32).collect();
        assert_eq!(first, want_first, "{name}: first values");
        let sum: f64 = values.iter().sum();
        assert!(
            (sum - want.sum).abs() <= 1e-9 * (1.0 + want.sum.abs()) + 1e-6,
            "{name}: sum {sum} vs {}",
            want.sum
        );
    }
}

#[test]
fn transformers_names_map_to_every_official_name() {
    let ckpt = tiny();
    assert_matches_official(&ckpt, "official_names.json");
    let names = ckpt.names();
    // The draft is kept, shared experts included (a known loader bug dropped them).
    let mtp: Vec<_> = names.iter().filter(|n| n.starts_with("mtp.")).collect();
    assert!(mtp.len() > 100, "{}", mtp.len());
    for n in [
        "mtp.0.main_proj.weight",
        "mtp.0.main_norm.weight",
        "mtp.2.norm.weight",
        "mtp.2.hc_head_fn",
        "mtp.2.markov_head.markov_w1.weight",
        "mtp.2.markov_head.markov_w2.weight",
        "mtp.2.confidence_head.proj.weight",
    ] {
        assert!(ckpt.contains(n), "{n}");
    }
    let shared = mtp
        .iter()
        .filter(|n| n.contains(".shared_experts."))
        .count();
    assert_eq!(shared, 9);
}

#[test]
fn official_quantized_checkpoint_reads_back_the_dequantized_values() {
    let ckpt = Checkpoint::open(&fixture("tiny-dsv4-quant")).unwrap();
    assert_matches_official(&ckpt, "official_names_quant.json");
    let fp8 = Some(WeightFormat::Fp8Block { block: [128, 128] });
    let fp4 = Some(WeightFormat::Fp4 { group: 32 });
    for (name, format) in [
        ("layers.1.attn.wq_b.weight", fp8),
        ("layers.1.attn.indexer.wq_b.weight", fp8),
        ("layers.0.ffn.shared_experts.w2.weight", fp8),
        ("mtp.0.main_proj.weight", fp8),
        ("layers.2.ffn.experts.7.w3.weight", fp4),
        ("mtp.2.ffn.experts.0.w1.weight", fp4),
        ("embed.weight", Some(WeightFormat::Plain)),
        (
            "layers.1.attn.compressor.wkv.weight",
            Some(WeightFormat::Plain),
        ),
    ] {
        assert_eq!(ckpt.format(name), format, "{name}");
    }
    let w = ckpt.spec("layers.2.ffn.experts.7.w3.weight").unwrap();
    assert_eq!((w.dtype, w.shape.clone()), (DType::I8, vec![32, 32]));
    let s = ckpt.spec("layers.2.ffn.experts.7.w3.scale").unwrap();
    assert_eq!((s.dtype, s.shape.clone()), (DType::F8E8M0, vec![32, 1]));
}

#[test]
fn merged_experts_split_into_views_of_the_same_bytes() {
    let ckpt = tiny();
    let w1 = ckpt.raw("layers.1.ffn.experts.3.w1.weight").unwrap();
    let w3 = ckpt.raw("layers.1.ffn.experts.3.w3.weight").unwrap();
    assert_eq!(w1.0.shape, vec![32, 32]);
    assert_eq!(w1.0.dtype, DType::BF16);
    // w3 of an expert follows its w1 in gate_up_proj.
    assert_eq!(w1.1.as_ptr() as usize + w1.1.len(), w3.1.as_ptr() as usize);
}

/// Writes the tiny checkpoint as two shards plus an index into `dir`.
fn write_two_shards(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(tiny_dir().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut shards: [Vec<(String, TensorView<'_>)>; 2] = [vec![], vec![]];
    let mut weight_map = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let view = st.tensor(name).unwrap();
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), file);
        shards[i % 2].push((name.clone(), view));
    }
    for (i, shard) in shards.into_iter().enumerate() {
        let path = dir.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        safetensors::serialize_to_file(shard, None, &path).unwrap();
    }
    let index =
        serde_json::json!({"metadata": {"total_size": bytes.len()}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    names
}

#[test]
fn sharded_index_loads_the_same_tensors() {
    let dir = tempfile::tempdir().unwrap();
    write_two_shards(dir.path());
    let sharded = Checkpoint::open(dir.path()).unwrap();
    let single = tiny();
    assert_eq!(sharded.names(), single.names());
    for name in single.names() {
        let (a, ab) = single.raw(&name).unwrap();
        let (b, bb) = sharded.raw(&name).unwrap();
        assert_eq!(a, b, "{name}");
        assert_eq!(ab, bb, "{name}");
    }
    assert_eq!(
        sharded
            .tensor_f32("layers.2.ffn.experts.5.w2.weight")
            .unwrap(),
        single
            .tensor_f32("layers.2.ffn.experts.5.w2.weight")
            .unwrap()
    );
}

#[test]
fn index_naming_a_tensor_its_shard_lacks_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_two_shards(dir.path());
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.layers.0.ghost.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.ghost.weight") && err.contains("model-00001-of-00002"),
        "{err}"
    );
}

#[test]
fn no_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

fn write_file(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn fp8_weight_without_scale_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let fp8 = safetensors::Dtype::F8_E4M3;
    write_file(
        &path,
        &[(
            "layers.0.attn.wq_a.weight",
            fp8,
            vec![128, 128],
            vec![0x38; 128 * 128],
        )],
    );
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, WeightsError::MissingScale { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("layers.0.attn.wq_a.weight") && msg.contains("layers.0.attn.wq_a.scale"),
        "{msg}"
    );

    // Wrong scale geometry is just as loud.
    let e8m0 = safetensors::Dtype::F8_E8M0;
    write_file(
        &path,
        &[
            (
                "layers.0.attn.wq_a.weight",
                fp8,
                vec![256, 128],
                vec![0x38; 256 * 128],
            ),
            ("layers.0.attn.wq_a.scale", e8m0, vec![1, 1], vec![127]),
        ],
    );
    let msg = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("layers.0.attn.wq_a.scale") && msg.contains("[2, 1]"),
        "{msg}"
    );

    // transformers' name for the scale works too.
    write_file(
        &path,
        &[
            (
                "model.layers.0.self_attn.q_a_proj.weight",
                fp8,
                vec![128, 128],
                vec![0x38; 128 * 128],
            ),
            (
                "model.layers.0.self_attn.q_a_proj.weight_scale_inv",
                e8m0,
                vec![1, 1],
                vec![128],
            ),
        ],
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let t = ckpt.tensor_f32("layers.0.attn.wq_a.weight").unwrap();
    assert!(t.data.iter().all(|&v| v == 2.0));
}

#[test]
fn unsupported_dtype_names_the_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_file(
        &path,
        &[("norm.weight", safetensors::Dtype::F64, vec![2], vec![0; 16])],
    );
    let msg = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("norm.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn slices_equal_the_slice_of_the_full_read() {
    let ckpt = tiny();
    let cases: &[(&str, usize, std::ops::Range<usize>)] = &[
        ("embed.weight", 0, 1000..1010),
        ("embed.weight", 1, 8..24),
        ("head.weight", 0, 64640..129280),
        ("layers.1.attn.wq_b.weight", 0, 128..256),
        ("layers.1.attn.wo_a.weight", 1, 0..64),
        ("layers.2.ffn.experts.3.w3.weight", 0, 16..32),
        ("layers.2.ffn.experts.3.w3.weight", 1, 3..9),
        ("layers.2.ffn.experts.7.w2.weight", 1, 16..32),
        ("layers.1.attn.compressor.ape", 1, 64..128),
        ("layers.1.hc_attn_fn", 1, 32..64),
        ("norm.weight", 0, 4..12),
    ];
    for (name, dim, range) in cases {
        let full = ckpt.tensor_f32(name).unwrap();
        let part = ckpt.tensor_f32_slice(name, *dim, range.clone()).unwrap();
        assert_eq!(part.shape[*dim], range.len(), "{name}");
        assert_bitwise_eq(name, &part.data, &slice_of(&full, *dim, range.clone()));
    }
    let err = ckpt
        .tensor_f32_slice("norm.weight", 0, 30..40)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("norm.weight") && err.contains("30..40"),
        "{err}"
    );
    assert!(ckpt.tensor_f32_slice("norm.weight", 1, 0..1).is_err());
    assert!(matches!(
        ckpt.tensor_f32("layers.9.attn.wq_a.weight"),
        Err(WeightsError::MissingTensor { .. })
    ));
    assert!(matches!(
        ckpt.tensor_f32("layers.0.ffn.gate.tid2eid"),
        Err(WeightsError::NotFloat { .. })
    ));
}

#[test]
fn tid2eid_reads_as_valid_expert_ids() {
    let ckpt = tiny();
    let (shape, ids) = ckpt.tensor_i64("layers.0.ffn.gate.tid2eid").unwrap();
    assert_eq!(shape, vec![129280, 2]);
    assert!(ids.iter().all(|&e| (0..8).contains(&e)));
    assert!(ids.chunks(2).all(|r| r[0] != r[1]));
}

fn dummy_manifest() -> Vec<TensorSpec> {
    let ckpt = tiny();
    let mut manifest: Vec<TensorSpec> = ckpt
        .names()
        .iter()
        .map(|n| ckpt.spec(n).unwrap().clone())
        .collect();
    manifest.extend([
        TensorSpec::new("layers.9.attn.wq_a.weight", &[256, 384], DType::F8E4M3),
        TensorSpec::new("layers.9.attn.wkv.weight", &[200, 300], DType::F8E4M3),
        TensorSpec::new("layers.9.attn.wkv.scale", &[2, 3], DType::F32),
        TensorSpec::new("layers.9.ffn.experts.0.w1.weight", &[64, 256], DType::I8),
        TensorSpec::new("layers.9.ffn.gate.weight", &[5, 32], DType::BF16),
        TensorSpec::new("layers.9.ffn.gate.tid2eid", &[100, 3], DType::I64),
        TensorSpec::new("layers.9.big.weight", &[1024, 1024], DType::F8E4M3),
    ]);
    manifest
}

#[test]
fn dummy_is_deterministic_and_has_the_manifest_dtypes() {
    let manifest = dummy_manifest();
    let a = Checkpoint::dummy(&manifest, 7);
    let b = Checkpoint::dummy(&manifest, 7);
    let c = Checkpoint::dummy(&manifest, 8);
    assert_eq!(a.names(), b.names());
    for name in a.names() {
        assert_eq!(a.raw(&name).unwrap(), b.raw(&name).unwrap(), "{name}");
    }
    assert_ne!(
        a.raw("embed.weight").unwrap().1,
        c.raw("embed.weight").unwrap().1
    );
    // Large tensors share a pool but not their bytes.
    assert_ne!(
        a.raw("embed.weight").unwrap().1,
        a.raw("head.weight").unwrap().1
    );

    for spec in &manifest {
        assert_eq!(a.spec(&spec.name), Some(spec), "{}", spec.name);
        if spec.dtype.is_float() || a.format(&spec.name) != Some(WeightFormat::Plain) {
            let t = a.tensor_f32(&spec.name).unwrap();
            assert!(t.data.iter().all(|v| v.is_finite()), "{}", spec.name);
            assert_eq!(t.shape, spec.shape);
        }
    }
    assert_eq!(
        a.format("layers.9.attn.wq_a.weight"),
        Some(WeightFormat::Fp8Block { block: [128, 128] })
    );
    let scale = a.spec("layers.9.attn.wq_a.scale").unwrap();
    assert_eq!(
        (scale.dtype, scale.shape.clone()),
        (DType::F8E8M0, vec![2, 3])
    );
    let scale = a.spec("layers.9.attn.wkv.scale").unwrap();
    assert_eq!((scale.dtype, scale.shape.clone()), (DType::F32, vec![2, 3]));
    assert_eq!(
        a.format("layers.9.ffn.experts.0.w1.weight"),
        Some(WeightFormat::Fp4 { group: 32 })
    );
    assert_eq!(
        a.raw("layers.9.ffn.experts.0.w1.weight").unwrap().1.len(),
        64 * 128
    );
    assert_eq!(
        a.spec("layers.9.ffn.experts.0.w1.scale").unwrap().shape,
        vec![64, 8]
    );
    let (_, ids) = a.tensor_i64("layers.9.ffn.gate.tid2eid").unwrap();
    assert!(ids.iter().all(|&e| (0..5).contains(&e)));
    for row in ids.chunks(3) {
        assert!(
            row[0] != row[1] && row[1] != row[2] && row[0] != row[2],
            "{row:?}"
        );
    }
    let (_, ids) = a.tensor_i64("layers.0.ffn.gate.tid2eid").unwrap();
    assert!(ids.iter().all(|&e| (0..8).contains(&e)));
    // Norms sit near 1 so a dummy forward stays finite.
    let norm = a.tensor_f32("norm.weight").unwrap();
    assert!(norm.data.iter().all(|v| (0.9..1.1).contains(v)));
}
