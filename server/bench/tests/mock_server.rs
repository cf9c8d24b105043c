//! End-to-end runs of the `dspark-bench` binary against an in-process mock OpenAI server whose
//! streaming schedule is known: measured figures must match that schedule, errors must be
//! classified, and every result file must be written.

use std::convert::Infallible;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};

/// The mock's schedule.
const TTFT_BASE: Duration = Duration::from_millis(100);
/// Extra prefill time per prompt token for token-id prompts (so TTFT grows with depth).
const PREFILL_PER_TOKEN: Duration = Duration::from_micros(50);
const TOKEN_GAP: Duration = Duration::from_millis(25);
const MAX_MODEL_LEN: u64 = 4096;
/// Counter increments per successful request: 10 drafts of 5 tokens, 30 accepted.
const ACCEPTED_PER_POS: [f64; 5] = [9.0, 8.0, 6.0, 4.0, 3.0];

#[derive(Default)]
struct Counters {
    drafts: f64,
    draft_tokens: f64,
    accepted: f64,
    per_pos: [f64; 5],
}

#[derive(Clone, Default)]
struct Mock {
    counters: Arc<Mutex<Counters>>,
}

fn error(status: StatusCode, msg: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": msg, "type": "mock", "code": status.as_u16()}})),
    )
        .into_response()
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": "mock-model", "object": "model", "max_model_len": MAX_MODEL_LEN}
    ]}))
}

async fn metrics(State(m): State<Mock>) -> String {
    let c = m.counters.lock().unwrap();
    let mut s = String::from("# TYPE vllm:spec_decode_num_drafts_total counter\n");
    s += &format!(
        "vllm:spec_decode_num_drafts_total{{model_name=\"mock-model\"}} {}\n",
        c.drafts
    );
    s += &format!(
        "vllm:spec_decode_num_draft_tokens_total{{model_name=\"mock-model\"}} {}\n",
        c.draft_tokens
    );
    s += &format!(
        "vllm:spec_decode_num_accepted_tokens_total{{model_name=\"mock-model\"}} {}\n",
        c.accepted
    );
    for (i, v) in c.per_pos.iter().enumerate() {
        s += &format!(
            "vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name=\"mock-model\",position=\"{i}\"}} {v}\n"
        );
    }
    s += "process_resident_memory_bytes 1.5e+08\n";
    s
}

/// Sends one SSE event as two body frames split mid-JSON, as TCP may deliver it.
async fn send_event(tx: &futures::channel::mpsc::UnboundedSender<Bytes>, data: &str) {
    let ev = format!("data: {data}\n\n");
    let (a, b) = ev.split_at(ev.len() / 2);
    let _ = tx.unbounded_send(Bytes::from(a.to_string()));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let _ = tx.unbounded_send(Bytes::from(b.to_string()));
}

async fn completion(State(m): State<Mock>, Json(req): Json<Value>) -> Response {
    let chat = req.get("messages").is_some();
    let (text, prompt_tokens, ids) = match (&req["messages"], &req["prompt"]) {
        (Value::Array(msgs), _) => {
            let t = msgs
                .last()
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default()
                .to_string();
            let n = t.split_whitespace().count() as u64;
            (t, n, 0)
        }
        (_, Value::String(t)) => (t.clone(), t.split_whitespace().count() as u64, 0),
        (_, Value::Array(ids)) => {
            if !ids
                .iter()
                .all(|x| x.as_u64().is_some_and(|v| (1000..=30000).contains(&v)))
            {
                return error(StatusCode::BAD_REQUEST, "token ids out of range");
            }
            (String::new(), ids.len() as u64, ids.len() as u64)
        }
        _ => return error(StatusCode::BAD_REQUEST, "no prompt"),
    };
    let max_tokens = req["max_tokens"].as_u64().unwrap_or(16);
    if req["stream"] != json!(true) || req["stream_options"]["include_usage"] != json!(true) {
        return error(
            StatusCode::BAD_REQUEST,
            "mock expects stream + include_usage",
        );
    }
    if prompt_tokens + max_tokens > MAX_MODEL_LEN {
        return error(StatusCode::BAD_REQUEST, "too long");
    }
    if text.contains("FAIL429") {
        return error(StatusCode::TOO_MANY_REQUESTS, "queue full");
    }
    if text.contains("FAIL500") {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "boom");
    }
    let slow = text.contains("SLOW");
    let stream_error = text.contains("STREAMERR");
    let send_usage = !text.contains("NOUSAGE");

    let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
    tokio::spawn(async move {
        let piece = |content: &str, finish: Value| {
            if chat {
                json!({"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": content}, "finish_reason": finish}]})
            } else {
                json!({"object": "text_completion", "choices": [
                    {"index": 0, "text": content, "finish_reason": finish}]})
            }
            .to_string()
        };
        // A role-only chunk at once, as vLLM sends: it is not a token and must not set TTFT.
        if chat {
            let role =
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]});
            send_event(&tx, &role.to_string()).await;
        }
        let prefill = TTFT_BASE + PREFILL_PER_TOKEN * ids as u32;
        tokio::time::sleep(if slow {
            Duration::from_secs(5)
        } else {
            prefill
        })
        .await;
        for i in 0..max_tokens {
            if i > 0 {
                tokio::time::sleep(TOKEN_GAP).await;
            }
            if stream_error && i == 2 {
                send_event(&tx, r#"{"error":{"message":"engine died","code":500}}"#).await;
                return;
            }
            let finish = if i + 1 == max_tokens {
                json!("length")
            } else {
                Value::Null
            };
            send_event(&tx, &piece(&format!("t{i} "), finish)).await;
        }
        if send_usage {
            let usage = json!({"choices": [], "usage": {"prompt_tokens": prompt_tokens,
                "completion_tokens": max_tokens, "total_tokens": prompt_tokens + max_tokens}});
            send_event(&tx, &usage.to_string()).await;
        }
        {
            let mut c = m.counters.lock().unwrap();
            c.drafts += 10.0;
            c.draft_tokens += 50.0;
            c.accepted += 30.0;
            for (p, v) in c.per_pos.iter_mut().zip(ACCEPTED_PER_POS) {
                *p += v;
            }
        }
        send_event(&tx, "[DONE]").await;
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(rx.map(Ok::<_, Infallible>)))
        .unwrap()
}

async fn start_mock() -> String {
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/chat/completions", post(completion))
        .route("/v1/completions", post(completion))
        .with_state(Mock::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}

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
