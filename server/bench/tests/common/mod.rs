//! A mock OpenAI-compatible server with a known streaming schedule, for dspark-bench's tests
//! and for trying the benchmark (or aiperf) without a GPU:
//! `cargo run -p dspark-bench --example mock_openai -- 8100`.
//!
//! Prompts containing FAIL429 / FAIL500 get that status, SLOW waits 5 s before the first token,
//! STREAMERR sends an error event after two tokens, DROP ends the body after two tokens without
//! `[DONE]`, NOUSAGE omits the usage chunk.

use std::convert::Infallible;
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
pub const TTFT_BASE: Duration = Duration::from_millis(100);
/// Extra prefill time per prompt token for token-id prompts (so TTFT grows with depth).
pub const PREFILL_PER_TOKEN: Duration = Duration::from_micros(50);
pub const TOKEN_GAP: Duration = Duration::from_millis(25);
pub const MAX_MODEL_LEN: u64 = 4096;
/// Counter increments per successful request: 10 drafts of 5 tokens, 30 accepted.
pub const ACCEPTED_PER_POS: [f64; 5] = [9.0, 8.0, 6.0, 4.0, 3.0];

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
    let drop_stream = text.contains("DROP");
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
            if drop_stream && i == 2 {
                return; // the body ends cleanly, but without [DONE]
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

pub fn router() -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/chat/completions", post(completion))
        .route("/v1/completions", post(completion))
        .with_state(Mock::default())
}

/// Serve the mock on an ephemeral loopback port; returns its base URL (with /v1).
pub async fn start_mock() -> String {
    let app = router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}
