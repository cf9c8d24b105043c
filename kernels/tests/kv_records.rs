//! The host codec of the KV pool's row records (`kv_record`) against bytes made by torch's own
//! float8_e4m3fn and bfloat16 conversions (tests/fixtures/make_kv_records.py): an independent
//! implementation of the same formats. The kernels are held to the host codec bit for bit by
//! the GPU test kv_record_gpu.rs.

use dspark_kernels::kv_record::KvRowFormat;

#[test]
fn host_codec_matches_torch_bytes() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kv_records.json"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for (i, c) in cases.iter().enumerate() {
        let dim = c["dim"].as_u64().unwrap() as usize;
        let format = match c["format"].as_str().unwrap() {
            "fp8_latent" => KvRowFormat::Fp8Latent {
                rope: c["rope"].as_u64().unwrap() as usize,
            },
            "fp8_indexer" => KvRowFormat::Fp8Indexer,
            "bf16" => KvRowFormat::Bf16,
            other => panic!("unknown format {other}"),
        };
        let row: Vec<f32> = c["row"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(row.len(), dim);
        let slots = format.encode_rows(&row, dim);
        let ours: String = slots
            .iter()
            .flat_map(|s| s.to_bits().to_le_bytes())
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            ours,
            c["bytes"].as_str().unwrap(),
            "case {i}: {format:?} dim {dim}"
        );
    }
}
