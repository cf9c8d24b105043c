//! The HTTP layer over the fake engine and the real tokenizer: shapes, errors, streaming.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::scheduler::fake_runner::FakeRunner;
use crate::scheduler::{Scheduler, SchedulerConfig};

const MAX_MODEL_LEN: usize = 128;
const BODY_LIMIT: usize = 4096;

fn tokenizer() -> Tokenizer {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-dsv4/tokenizer.json");
    Tokenizer::from_file(&path).expect("tokenizer.json of the tiny model")
}

fn state(api_key: Option<&str>, ready: bool) -> Arc<AppState> {
    let metrics = Arc::new(Metrics::new("tiny"));
    let state = Arc::new(AppState::new(
        "tiny".into(),
        "/m/tiny".into(),
        api_key.map(String::from),
        metrics.clone(),
    ));
    if ready {
        let tok = tokenizer();
        let runner = FakeRunner::new(16, 64, tok.vocab_size());
        let sched = Scheduler::new(
            Box::new(runner),
            SchedulerConfig {
                max_num_seqs: 4,
                max_num_batched_tokens: 256,
                max_model_len: MAX_MODEL_LEN,
                max_waiting_requests: 16,
                prefix_caching: true,
                eos: tok.special().eos,
            },
            metrics,
        );
        let (handle, _join) = SchedulerHandle::spawn(sched).unwrap();
        state.set_serving(Serving {
            scheduler: handle,
            tokenizer: tok,
        });
    }
    state
}

async fn call(
    state: &Arc<AppState>,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    key: Option<&str>,
) -> (StatusCode, Vec<u8>) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req
        .header("content-type", "application/json")
        .body(body.map(Body::from).unwrap_or_else(Body::empty))
        .unwrap();
    let resp = router(state.clone(), BODY_LIMIT)
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, bytes.to_vec())
}

async fn post(state: &Arc<AppState>, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, b) = call(
        state,
        "POST",
        path,
        Some(serde_json::to_vec(&body).unwrap()),
        None,
    )
    .await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn assert_error_shape(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

#[tokio::test]
async fn not_ready_until_the_engine_is_set() {
    let st = state(None, false);
    assert_eq!(
        call(&st, "GET", "/health", None, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&st, "GET", "/ready", None, None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (s, v) = post(&st, "/v1/completions", json!({"prompt": "x"})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_error_shape(&v);
    // The model is listed while it loads, without a context limit it cannot know yet (not 0).
    let (s, b) = call(&st, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["data"][0]["id"], "tiny");
    assert!(v["data"][0].get("max_model_len").is_none(), "{v}");
    let st = state(None, true);
    assert_eq!(
        call(&st, "GET", "/ready", None, None).await.0,
        StatusCode::OK
    );
    st.begin_shutdown();
    assert_eq!(
        call(&st, "GET", "/ready", None, None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn completion_and_chat_shapes() {
    let st = state(None, true);
    let (s, v) = post(
        &st,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "Hello", "max_tokens": 5, "ignore_eos": true, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let (s, v) = post(
        &st,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": true,
               "logprobs": true, "top_logprobs": 2, "chat_template_kwargs": {"thinking": false}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        v["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 2);
}

#[tokio::test]
async fn streaming_ends_with_done_and_matches_non_streaming() {
    let st = state(None, true);
    let req = json!({"prompt": "Stream me", "max_tokens": 8, "ignore_eos": true, "temperature": 0});
    let (_, full) = post(&st, "/v1/completions", req.clone()).await;
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let (s, body) = call(
        &st,
        "POST",
        "/v1/completions",
        Some(serde_json::to_vec(&sreq).unwrap()),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let body = String::from_utf8(body).unwrap();
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["text"].as_str())
                .map(String::from)
        })
        .collect();
    assert_eq!(text, full["choices"][0]["text"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn stop_strings_cut_the_text() {
    let st = state(None, true);
    let req = json!({"prompt": "abc", "max_tokens": 24, "ignore_eos": true, "temperature": 0});
    let (_, full) = post(&st, "/v1/completions", req.clone()).await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 8, "{text:?}");
    let stop: String = chars[5..7].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    let mut sreq = req.clone();
    sreq["stop"] = json!(stop);
    let (_, v) = post(&st, "/v1/completions", sreq).await;
    assert_eq!(v["choices"][0]["text"], cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn errors_have_openai_shape_and_status() {
    let st = state(None, true);
    let cases: Vec<(Value, StatusCode)> = vec![
        (
            json!({"model": "other", "prompt": "x"}),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({"prompt": "x", "temperature": -1}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"prompt": "x", "temperature": "hot"}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"prompt": "x", "n": 5}), StatusCode::BAD_REQUEST),
        (
            json!({"prompt": "x", "max_tokens": MAX_MODEL_LEN}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"prompt": vec![5; MAX_MODEL_LEN]}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"prompt": [1_000_000]}), StatusCode::BAD_REQUEST),
        (
            json!({"prompt": "x", "logit_bias": {"a": 1}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"prompt": "x", "presence_penalty": 0.5}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"nothing": true}), StatusCode::BAD_REQUEST),
    ];
    for (body, status) in cases {
        let (s, v) = post(&st, "/v1/completions", body.clone()).await;
        assert_eq!(s, status, "{body} -> {v}");
        assert_error_shape(&v);
    }
    let (s, b) = call(
        &st,
        "POST",
        "/v1/chat/completions",
        Some(b"{\"messages\": [".to_vec()),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error_shape(&serde_json::from_slice(&b).unwrap());
    let huge = serde_json::to_vec(&json!({"prompt": "x".repeat(BODY_LIMIT * 2)})).unwrap();
    let (s, b) = call(&st, "POST", "/v1/completions", Some(huge), None).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error_shape(&serde_json::from_slice(&b).unwrap());
    let (s, _) = call(&st, "GET", "/v1/nothing", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn api_key_guards_v1_only() {
    let st = state(Some("k1"), true);
    let (s, b) = call(&st, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error_shape(&serde_json::from_slice(&b).unwrap());
    assert_eq!(
        call(&st, "GET", "/v1/models", None, Some("nope")).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, b) = call(&st, "GET", "/v1/models", None, Some("k1")).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(v["data"][0]["max_model_len"], MAX_MODEL_LEN);
    for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
        assert_eq!(
            call(&st, "GET", path, None, None).await.0,
            StatusCode::OK,
            "{path}"
        );
    }
}

/// Pushes `text` (tokenized) through a chat choice pipeline, ending with EOS.
fn chat_pipeline(
    text: &str,
    thinking: bool,
    tools: bool,
    stop: Vec<String>,
) -> (String, String, Vec<(String, String)>, Option<&'static str>) {
    use super::generate::{validate_common, ChoiceText};
    use crate::scheduler::FinishReason;
    let tok = tokenizer();
    let limits = crate::scheduler::handle::Limits {
        max_model_len: 1024,
        pool_tokens: 4096,
        block_size: 16,
        vocab_size: tok.vocab_size(),
        max_waiting_requests: 1,
        max_num_seqs: 1,
    };
    let common = types::CommonParams {
        stop: Some(types::StopField::Many(stop)),
        ..Default::default()
    };
    let v = validate_common(&common, None, None, &limits).unwrap();
    let mut ct = ChoiceText::new(&tok, &v, Some((thinking, tools)));
    let (mut content, mut reasoning, mut calls) = (String::new(), String::new(), Vec::new());
    let mut ids = tok.encode(text).unwrap();
    ids.push(tok.special().eos);
    let last = ids.len() - 1;
    for (i, id) in ids.into_iter().enumerate() {
        let finish = (i == last).then_some((FinishReason::Stop, true));
        let (d, _) = ct.push(id, finish);
        content.push_str(&d.text);
        reasoning.push_str(&d.reasoning);
        calls.extend(
            d.tool_calls
                .into_iter()
                .map(|(_, _, name, args)| (name, args)),
        );
        if ct.finished.is_some() {
            break;
        }
    }
    (content, reasoning, calls, ct.finished)
}

#[test]
fn chat_output_is_split_into_reasoning_content_and_tool_calls() {
    let (content, reasoning, calls, finish) =
        chat_pipeline("let me think</think>The answer", true, false, vec![]);
    assert_eq!(
        (reasoning.as_str(), content.as_str(), finish),
        ("let me think", "The answer", Some("stop"))
    );
    assert!(calls.is_empty());

    let call = "Checking.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    let (content, reasoning, calls, finish) = chat_pipeline(call, false, true, vec![]);
    assert_eq!(content, "Checking.");
    assert!(reasoning.is_empty());
    assert_eq!(
        calls,
        vec![(
            "get_weather".to_string(),
            "{\"city\": \"Paris\"}".to_string()
        )]
    );
    assert_eq!(finish, Some("tool_calls"));

    // Without tools offered, the same text stays content.
    let (content, _, calls, finish) = chat_pipeline(call, false, false, vec![]);
    assert!(calls.is_empty() && content.contains("get_weather"));
    assert_eq!(finish, Some("stop"));

    // Stop strings apply to the text before it is parsed.
    let (content, _, _, finish) =
        chat_pipeline("one two three", false, false, vec![" three".into()]);
    assert_eq!((content.as_str(), finish), ("one two", Some("stop")));
}
