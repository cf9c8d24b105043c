//! End-to-end runs of the `dspark-bench` binary against an in-process mock OpenAI server whose
//! streaming schedule is known: measured figures must match that schedule, errors must be
//! classified, and every result file must be written.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{start_mock, PREFILL_PER_TOKEN, TOKEN_GAP, TTFT_BASE};
use serde_json::{json, Value};

async fn bench(base_url: &str, out_dir: &Path, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dspark-bench"))
        .args(args)
        .args(["--base-url", base_url, "--out"])
        .arg(out_dir)
        .arg("--quiet")
        .env_remove("OPENAI_API_KEY")
        .env_remove("DSPARK_BENCH_BASE_URL")
        .output()
        .await
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    // DSPARK_BENCH_TEST_KEEP=DIR keeps the produced files, to look at the plots.
    if let Some(keep) = std::env::var_os("DSPARK_BENCH_TEST_KEEP") {
        std::fs::create_dir_all(&keep).unwrap();
        for f in std::fs::read_dir(out_dir).unwrap().flatten() {
            let _ = std::fs::copy(f.path(), Path::new(&keep).join(f.file_name()));
        }
    }
    out
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    assert!(bytes.len() > 2000, "{} looks empty", path.display());
}

fn group<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == name)
        .unwrap_or_else(|| panic!("no group {name}"))
}

fn write_prompts(dir: &Path, name: &str, lines: &[Value]) -> String {
    let p = dir.join(name);
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&p, text.join("\n")).unwrap();
    p.display().to_string()
}

/// Bounds derived from the mock's schedule: TTFT is at least the mock's prefill delay and,
/// on an idle loopback, well under a second more; decode gaps are at least TOKEN_GAP.
fn assert_timing_matches_schedule(rec: &Value, prefill: Duration) {
    let ttft = rec["ttft_s"].as_f64().unwrap();
    assert!(
        ttft >= prefill.as_secs_f64() && ttft < prefill.as_secs_f64() + 0.6,
        "ttft {ttft} vs schedule {prefill:?}"
    );
    let tok_s = rec["decode_tok_s"].as_f64().unwrap();
    let nominal = 1.0 / TOKEN_GAP.as_secs_f64(); // 40 tok/s
    assert!(
        tok_s > nominal * 0.4 && tok_s <= nominal * 1.1,
        "decode {tok_s} tok/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decode_measures_schedule_classifies_errors_and_reads_acceptance() {
    let base = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let code = write_prompts(
        dir.path(),
        "code.jsonl",
        &[
            json!({"prompt": "def add(a, b):", "id": "c0"}),
            json!({"prompt": "def sub(a, b):", "id": "c1"}),
            json!({"prompt": "def mul(a, b):", "id": "c2"}),
        ],
    );
    let chat = write_prompts(
        dir.path(),
        "chat.jsonl",
        &[
            json!({"messages": [{"role": "user", "content": "hello there"}], "id": "ok"}),
            json!({"prompt": "FAIL429", "id": "e429"}),
            json!({"prompt": "FAIL500", "id": "e500"}),
            json!({"prompt": "STREAMERR", "id": "se"}),
            json!({"prompt": "NOUSAGE please", "id": "nu"}),
        ],
    );
    let prompts = format!("{code},{chat}");
    let out = bench(
        &base,
        dir.path(),
        &[
            "decode",
            "--prompts",
            &prompts,
            "--requests",
            "5",
            "--max-tokens",
            "20",
        ],
    )
    .await;
    assert!(out.status.success());
    let r = read_json(&dir.path().join("decode.json"));
    assert_eq!(r["model"], "mock-model"); // discovered from /v1/models

    let code_g = group(&r, "code");
    assert_eq!(code_g["requests"], 5); // 3 prompts, wrapped around
    assert_eq!(code_g["ok"], 5);
    assert_eq!(code_g["output_tokens"], 100);
    let chat_g = group(&r, "chat");
    assert_eq!(chat_g["ok"], 2);
    assert_eq!(
        chat_g["errors"],
        json!({"http_429": 1, "http_500": 1, "stream_error": 1})
    );
    assert_eq!(r["errors"], chat_g["errors"]);

    for rec in r["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["ok"] == true)
    {
        assert_timing_matches_schedule(rec, TTFT_BASE);
        assert_eq!(rec["output_tokens"], 20);
        assert_eq!(rec["text_chunks"], 20);
        let usage = rec["prompt_id"] != "nu";
        assert_eq!(rec["usage_reported"], usage, "{rec}");
    }
    let peak = code_g["decode_tok_s"]["max"].as_f64().unwrap();
    let mean = code_g["decode_tok_s"]["mean"].as_f64().unwrap();
    assert!(peak >= mean && mean > 0.0);
    let itl_p50 = code_g["itl_s"]["p50"].as_f64().unwrap();
    let gap = TOKEN_GAP.as_secs_f64();
    assert!(
        (gap * 0.6..gap + 0.2).contains(&itl_p50),
        "itl p50 {itl_p50}"
    );

    // The mock adds 10 drafts / 50 draft tokens / 30 accepted per successful request.
    let acc = &code_g["acceptance"];
    assert_eq!(acc["drafts"], 50.0);
    assert!((acc["acceptance_rate"].as_f64().unwrap() - 0.6).abs() < 1e-9);
    assert!((acc["mean_acceptance_length"].as_f64().unwrap() - 4.0).abs() < 1e-9);
    assert_eq!(acc["per_position_rate"], json!([0.9, 0.8, 0.6, 0.4, 0.3]));
    assert_eq!(chat_g["acceptance"]["drafts"], 20.0);

    let requests_csv = std::fs::read_to_string(dir.path().join("decode_requests.csv")).unwrap();
    assert_eq!(requests_csv.lines().count(), 1 + 10);
    let groups_csv = std::fs::read_to_string(dir.path().join("decode_groups.csv")).unwrap();
    assert_eq!(groups_csv.lines().count(), 1 + 2);
    assert!(groups_csv.contains("http_429=1;http_500=1;stream_error=1"));
    assert_png(&dir.path().join("decode_itl_histogram.png"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("60.0%") && stdout.contains("4.00"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_scales_on_independent_streams() {
    let base = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let out = bench(
        &base,
        dir.path(),
        &[
            "concurrency",
            "--levels",
            "1,4",
            "--requests",
            "4",
            "--max-tokens",
            "12",
            "--ignore-eos",
        ],
    )
    .await;
    assert!(out.status.success());
    let r = read_json(&dir.path().join("concurrency.json"));
    let (c1, c4) = (group(&r, "c=1"), group(&r, "c=4"));
    assert_eq!((c1["ok"].as_u64(), c4["ok"].as_u64()), (Some(4), Some(4)));
    // The mock serves streams independently, so four at once take about as long as one:
    // aggregate throughput must scale far beyond the single stream's.
    let (a1, a4) = (
        c1["aggregate_tok_s"].as_f64().unwrap(),
        c4["aggregate_tok_s"].as_f64().unwrap(),
    );
    assert!(a4 > 2.5 * a1, "c=1 {a1} tok/s, c=4 {a4} tok/s");
    let per4 = c4["per_stream_tok_s"].as_f64().unwrap();
    assert!((per4 - a4 / 4.0).abs() < 1e-9);
    let body = &r["requests"][0];
    assert_eq!(r["settings"]["params"]["ignore_eos"], true);
    assert!(body["ttft_s"].as_f64().is_some());
    assert_png(&dir.path().join("throughput_vs_concurrency.png"));
    assert_png(&dir.path().join("concurrency_itl_histogram.png"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefill_sends_exact_token_ids_and_skips_over_long_depths() {
    let base = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let out = bench(
        &base,
        dir.path(),
        &[
            "prefill",
            "--depths",
            "1K,2K,4K",
            "--max-tokens",
            "4",
            "--seed",
            "3",
        ],
    )
    .await;
    assert!(out.status.success());
    let r = read_json(&dir.path().join("prefill.json"));
    // 4K + 4 output tokens exceeds the mock's max_model_len of 4096.
    assert_eq!(r["groups"].as_array().unwrap().len(), 2);
    assert!(r["skipped"][0].as_str().unwrap().contains("4K"));
    for (name, depth) in [("depth=1K", 1024u32), ("depth=2K", 2048)] {
        let g = group(&r, name);
        assert_eq!(g["ok"], 1, "{g}");
        assert_eq!(g["prompt_tokens_mean"], depth as f64);
        let rec = r["requests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["group"] == name)
            .unwrap();
        assert_timing_matches_schedule(rec, TTFT_BASE + PREFILL_PER_TOKEN * depth);
    }
    assert_png(&dir.path().join("ttft_vs_prompt_len.png"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poisson_arrivals_all_complete() {
    let base = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let out = bench(
        &base,
        dir.path(),
        &[
            "poisson",
            "--rate",
            "20",
            "--requests",
            "8",
            "--max-tokens",
            "5",
        ],
    )
    .await;
    assert!(out.status.success());
    let r = read_json(&dir.path().join("poisson.json"));
    let g = group(&r, "rate=20");
    assert_eq!(
        (g["requests"].as_u64(), g["ok"].as_u64()),
        (Some(8), Some(8))
    );
    let mut starts: Vec<f64> = r["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["start_s"].as_f64().unwrap())
        .collect();
    starts.sort_by(f64::total_cmp);
    starts.dedup();
    assert_eq!(starts.len(), 8, "arrivals are staggered, not simultaneous");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_reports_windows_and_rss() {
    let base = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id().to_string();
    let out = bench(
        &base,
        dir.path(),
        &[
            "soak",
            "--duration",
            "3s",
            "--window",
            "1s",
            "--concurrency",
            "2",
            "--max-tokens",
            "4",
            "--server-pid",
            &pid,
        ],
    )
    .await;
    assert!(out.status.success());
    let r = read_json(&dir.path().join("soak.json"));
    let windows = r["windows"].as_array().unwrap();
    assert!(windows.len() >= 3, "{windows:?}");
    let done: u64 = windows
        .iter()
        .map(|w| w["completed"].as_u64().unwrap())
        .sum();
    assert_eq!(done, r["requests"].as_array().unwrap().len() as u64);
    assert!(windows[0]["e2e_p50_s"].as_f64().unwrap() >= TTFT_BASE.as_secs_f64());
    let rss = r["rss"].as_array().unwrap();
    assert!(rss.len() >= 2 && rss.iter().all(|s| s["bytes"].as_u64().unwrap() > 0));
    assert!(std::fs::read_to_string(dir.path().join("soak_windows.csv"))
        .unwrap()
        .starts_with("start_s,"));
    assert_png(&dir.path().join("soak_latency.png"));
    assert_png(&dir.path().join("soak_rss.png"));

    // Without a pid, RSS comes from the server's process_resident_memory_bytes.
    let dir2 = tempfile::tempdir().unwrap();
    let out = bench(
        &base,
        dir2.path(),
        &[
            "soak",
            "--duration",
            "2s",
            "--window",
            "1s",
            "--max-tokens",
            "2",
        ],
    )
    .await;
    assert!(out.status.success());
    let r = read_json(&dir2.path().join("soak.json"));
    assert_eq!(r["rss"][0]["bytes"], 150_000_000u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timeouts_and_connection_failures_are_classified() {
    let base = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let slow = write_prompts(dir.path(), "slow.jsonl", &[json!({"prompt": "SLOW"})]);
    let out = bench(
        &base,
        dir.path(),
        &[
            "decode",
            "--prompts",
            &slow,
            "--requests",
            "2",
            "--timeout",
            "1s",
        ],
    )
    .await;
    assert!(!out.status.success(), "every request failed: non-zero exit");
    let r = read_json(&dir.path().join("decode.json"));
    assert_eq!(r["errors"], json!({"timeout": 2}));
    for rec in r["requests"].as_array().unwrap() {
        let e2e = rec["e2e_s"].as_f64().unwrap();
        assert!((1.0..2.0).contains(&e2e), "timed out at {e2e}s");
    }

    // A body that ends without [DONE] is not a success, even with tokens received.
    let drop = write_prompts(dir.path(), "drop.jsonl", &[json!({"prompt": "DROP"})]);
    let out = bench(
        &base,
        dir.path(),
        &["decode", "--prompts", &drop, "--requests", "2"],
    )
    .await;
    assert!(!out.status.success());
    let r = read_json(&dir.path().join("decode.json"));
    assert_eq!(r["errors"], json!({"incomplete_stream": 2}));
    assert_eq!(r["requests"][0]["text_chunks"], 2);

    // Nothing listens on this port once the listener is dropped.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://127.0.0.1:{port}/v1");
    let dir = tempfile::tempdir().unwrap();
    let out = bench(
        &dead,
        dir.path(),
        &[
            "concurrency",
            "--levels",
            "2",
            "--model",
            "m",
            "--no-metrics",
        ],
    )
    .await;
    assert!(!out.status.success());
    let r = read_json(&dir.path().join("concurrency.json"));
    assert_eq!(r["errors"], json!({"connection": 4}));

    // Without --model the model list is needed; a dead server is a clear error, not a hang.
    let out = bench(&dead, dir.path(), &["decode"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/models"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acceptance_requires_moving_counters() {
    let base = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "acceptance",
        "--prompts",
        "builtin:mtbench",
        "--requests",
        "2",
        "--max-tokens",
        "3",
    ];
    assert!(bench(&base, dir.path(), &args).await.status.success());
    let r = read_json(&dir.path().join("acceptance.json"));
    assert_eq!(group(&r, "mtbench")["acceptance"]["drafts"], 20.0);
    let mut no_metrics = args.to_vec();
    no_metrics.push("--no-metrics");
    let out = bench(&base, dir.path(), &no_metrics).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("speculative-decoding counters"));
}
