//! `dspark-server bench` as a user runs it: the real binary on the tiny model, CPU backend.

use std::path::Path;
use std::process::Command;

fn bench() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dspark-server"));
    c.arg("bench")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn");
    // The bench's flags read DSPARK_* variables: keep the caller's out of the test.
    for (k, _) in std::env::vars() {
        if k.starts_with("DSPARK_") {
            c.env_remove(k);
        }
    }
    c
}

/// One CSV line's fields, read by the `csv` crate (an independent reader of what we write).
fn split_csv(line: &str) -> Vec<String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(line.as_bytes());
    let record = reader
        .records()
        .next()
        .expect("one record")
        .expect("valid CSV");
    record.iter().map(String::from).collect()
}

fn column<'a>(header: &[String], row: &'a [String], name: &str) -> &'a str {
    let i = header
        .iter()
        .position(|h| *h == name)
        .unwrap_or_else(|| panic!("no column {name}"));
    &row[i]
}

#[test]
fn tiny_model_cases_write_a_table_and_a_csv() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bench.csv");
    let out = bench()
        .args([
            "--device",
            "cpu",
            "--cases",
            "decode:1:256,decode:2:256,prefill:512,verify:1:256:5,decode:1:4096",
            "--max-context",
            "1024",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--copy-bytes",
            "67108864",
            "--csv",
        ])
        .arg(&csv)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("copy bandwidth:"), "{stdout}");
    assert!(stdout.contains("layers run: 4 of 4"), "{stdout}");
    assert!(
        stdout.contains("decode:1:4096") && stdout.contains("above --max-context 1024"),
        "{stdout}"
    );
    assert!(
        !stdout.to_lowercase().contains("acceptance rate"),
        "{stdout}"
    );

    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let header = split_csv(lines[0]);
    for name in [
        "case",
        "batch",
        "context",
        "tokens",
        "step_ms",
        "tok_s",
        "bytes",
        "gb_s",
        "pct_of_copy",
        "device_name",
        "layers",
        "full_layers",
        "date",
    ] {
        assert!(
            header.iter().any(|h| h == name),
            "missing column {name}: {header:?}"
        );
    }
    assert_eq!(lines.len(), 6, "{text}");
    let rows: Vec<Vec<String>> = lines[1..].iter().map(|l| split_csv(l)).collect();
    let expect = [
        ("decode:1:256", "1", "256", "1"),
        ("decode:2:256", "2", "256", "2"),
        ("prefill:512", "1", "0", "512"),
        ("verify:1:256:5", "1", "256", "6"),
    ];
    for (row, (case, batch, context, tokens)) in rows.iter().zip(expect) {
        assert_eq!(row.len(), header.len(), "{row:?}");
        assert_eq!(column(&header, row, "case"), case);
        assert_eq!(column(&header, row, "batch"), batch);
        assert_eq!(column(&header, row, "context"), context);
        assert_eq!(column(&header, row, "tokens"), tokens);
        assert_eq!(column(&header, row, "status"), "ok");
        assert_eq!(column(&header, row, "layers"), "4");
        assert_eq!(column(&header, row, "full_layers"), "4");
        assert_eq!(column(&header, row, "device"), "cpu");
        for name in [
            "step_ms",
            "tok_s",
            "bytes",
            "gb_s",
            "pct_of_copy",
            "copy_gb_s",
        ] {
            let v: f64 = column(&header, row, name).parse().unwrap();
            assert!(v.is_finite() && v > 0.0, "{case} {name} = {v}");
        }
        // tok/s is tokens over the step time.
        let ms: f64 = column(&header, row, "step_ms").parse().unwrap();
        let tok_s: f64 = column(&header, row, "tok_s").parse().unwrap();
        let tokens: f64 = column(&header, row, "tokens").parse().unwrap();
        assert!(
            (tok_s - tokens / (ms / 1e3)).abs() / tok_s < 1e-3,
            "{row:?}"
        );
    }
    let skipped = &rows[4];
    assert_eq!(column(&header, skipped, "case"), "decode:1:4096");
    assert!(column(&header, skipped, "status").starts_with("skipped"));
    assert_eq!(column(&header, skipped, "step_ms"), "");
}

#[test]
fn shared_context_and_reduced_depth() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bench.csv");
    // 300 tokens of context: two full blocks shared by the three sequences, a partial third
    // block each (filled per sequence).
    let out = bench()
        .args([
            "--device",
            "cpu",
            "--cases",
            "decode:3:300,verify:2:300:5",
            "--shared-context",
            "--num-layers",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--copy-bytes",
            "16777216",
            "--csv",
        ])
        .arg(&csv)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("layers run: 2 of 4"), "{stdout}");
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let header = split_csv(lines[0]);
    assert_eq!(lines.len(), 3, "{text}");
    for line in &lines[1..] {
        let row = split_csv(line);
        assert_eq!(column(&header, &row, "status"), "ok");
        assert_eq!(column(&header, &row, "kv_context"), "shared");
        assert_eq!(column(&header, &row, "layers"), "2");
        let ms: f64 = column(&header, &row, "step_ms").parse().unwrap();
        let scaled: f64 = column(&header, &row, "scaled_step_ms").parse().unwrap();
        assert!((scaled / ms - 2.0).abs() < 1e-3, "{line}");
        let bytes: f64 = column(&header, &row, "bytes").parse().unwrap();
        let full: f64 = column(&header, &row, "full_depth_bytes").parse().unwrap();
        assert!(full > bytes && bytes > 0.0, "{line}");
    }
}

#[test]
fn bad_flags_exit_non_zero_with_a_clear_message() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["--cases", "decode:x:256"],
            "batch `x` is not a positive integer",
        ),
        (&["--cases", "train:1:1"], "unknown kind `train`"),
        (&["--world-size", "0"], "--world-size must be at least 1"),
        (&["--iters", "0"], "--iters must be at least 1"),
        (&["--num-layers", "9"], "only 4 layers"),
        (
            &["--csv", "/nonexistent/dir/bench.csv"],
            "cannot create the CSV /nonexistent/dir/bench.csv",
        ),
    ];
    for (args, want) in cases {
        let out = bench()
            .args(["--device", "cpu", "--copy-bytes", "1048576"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let out = bench().args(["--device", "tpu"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tpu"));
    let missing = Path::new("/nonexistent/config.json");
    let out = bench()
        .args(["--device", "cpu", "--config-json"])
        .arg(missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config.json"));
}

#[test]
fn random_kv_fill_times_decode_without_a_prefill() {
    let out = bench()
        .args([
            "--device",
            "cpu",
            "--cases",
            "decode:2:2048,verify:1:2048:5",
            "--kv-fill",
            "random",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--copy-bytes",
            "67108864",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("written as random KV"), "{stdout}");
    assert!(stdout.contains("decode:2:2048") && stdout.contains("verify:1:2048:5"));
    assert!(!stdout.contains("error"), "{stdout}");
}
