//! One streaming request against an OpenAI-compatible endpoint, timed from the client side.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

use crate::prompts::Message;
use crate::sse::{parse_chunk, Chunk, SseParser};

/// Which OpenAI API a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// /v1/chat/completions
    Chat,
    /// /v1/completions
    Completions,
}

/// The prompt part of a request body.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Chat(Vec<Message>),
    Text(String),
    TokenIds(Vec<u32>),
}

/// Sampling and length settings shared by every request of a run.
#[derive(Debug, Clone, Serialize)]
pub struct GenParams {
    pub max_tokens: u32,
    pub temperature: f64,
    pub ignore_eos: bool,
    pub seed: Option<u64>,
    /// Merged into every request body last (e.g. `chat_template_kwargs`).
    pub extra_body: Option<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("building HTTP client: {0}")]
    Build(reqwest::Error),
    #[error("GET {url}: {reason}")]
    Discovery { url: String, reason: String },
}

/// Where requests go and how they authenticate.
#[derive(Debug, Clone)]
pub struct Endpoint {
    http: reqwest::Client,
    /// e.g. `http://127.0.0.1:8000/v1`, no trailing slash.
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
}

/// Facts `/v1/models` gives about the served model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    /// vLLM's (and dspark's) extension field; absent on other servers.
    pub max_model_len: Option<u64>,
}

/// Failure class of a request, as reported in the error tables.
pub fn http_status_class(status: u16) -> String {
    format!("http_{status}")
}
pub const ERR_TIMEOUT: &str = "timeout";
pub const ERR_CONNECTION: &str = "connection";
pub const ERR_STREAM: &str = "stream_error";
pub const ERR_INCOMPLETE: &str = "incomplete_stream";
pub const ERR_INVALID: &str = "invalid_response";

/// Everything measured about one request. Times are seconds; `start_s` is relative to the run.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// Scenario group (prompt set, concurrency level, depth, rate...).
    pub group: String,
    pub prompt_id: String,
    pub start_s: f64,
    pub ok: bool,
    pub error: Option<String>,
    pub error_detail: Option<String>,
    /// Time to the first chunk carrying generated text.
    pub ttft_s: Option<f64>,
    /// Time to the end of the stream.
    pub e2e_s: f64,
    /// From the usage chunk when the server sends one, else the number of text chunks.
    pub output_tokens: u64,
    pub prompt_tokens: Option<u64>,
    pub usage_reported: bool,
    /// Number of chunks that carried text (with speculative decoding one chunk may hold several
    /// tokens, so this can be below `output_tokens`).
    pub text_chunks: u64,
    /// Mean time per output token after the first: (last - first token time) / (tokens - 1).
    pub tpot_s: Option<f64>,
    /// 1 / tpot: this request's decode speed, prefill excluded.
    pub decode_tok_s: Option<f64>,
    /// Gaps between consecutive text chunks (vLLM's "ITL").
    #[serde(skip)]
    pub itl_s: Vec<f64>,
}

impl RequestRecord {
    fn failed(group: &str, prompt_id: &str, start_s: f64, class: &str, detail: String) -> Self {
        Self {
            group: group.to_string(),
            prompt_id: prompt_id.to_string(),
            start_s,
            ok: false,
            error: Some(class.to_string()),
            error_detail: Some(detail),
            ttft_s: None,
            e2e_s: 0.0,
            output_tokens: 0,
            prompt_tokens: None,
            usage_reported: false,
            text_chunks: 0,
            tpot_s: None,
            decode_tok_s: None,
            itl_s: Vec::new(),
        }
    }
}

impl Endpoint {
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        model: String,
        connect_timeout: Duration,
    ) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_max_idle_per_host(1024)
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            model,
        })
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let rb = self.http.get(url);
        match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// The server's model list; the first entry is the default model.
    pub async fn models(&self) -> Result<Vec<ModelCard>, ClientError> {
        let url = format!("{}/models", self.base_url);
        let fail = |reason: String| ClientError::Discovery {
            url: url.clone(),
            reason,
        };
        let resp = self
            .get(&url)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let body: Value = resp.json().await.map_err(|e| fail(e.to_string()))?;
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}: {body}")));
        }
        let data = body
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| fail("no `data` array".into()))?;
        Ok(data
            .iter()
            .filter_map(|m| {
                Some(ModelCard {
                    id: m.get("id")?.as_str()?.to_string(),
                    max_model_len: m.get("max_model_len").and_then(Value::as_u64),
                })
            })
            .collect())
    }

    /// Raw text of a URL (used for /metrics).
    pub async fn get_text(&self, url: &str) -> Result<String, ClientError> {
        let fail = |reason: String| ClientError::Discovery {
            url: url.to_string(),
            reason,
        };
        let resp = self
            .get(url)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        resp.text().await.map_err(|e| fail(e.to_string()))
    }

    /// The JSON body for one streaming request.
    pub fn body(&self, payload: &Payload, p: &GenParams) -> Value {
        let mut body = json!({
            "model": self.model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match payload {
            Payload::Chat(m) => body["messages"] = json!(m),
            Payload::Text(t) => body["prompt"] = json!(t),
            Payload::TokenIds(ids) => body["prompt"] = json!(ids),
        }
        if p.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(seed) = p.seed {
            body["seed"] = json!(seed);
        }
        if let (Some(Value::Object(extra)), Some(obj)) = (&p.extra_body, body.as_object_mut()) {
            for (k, v) in extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        body
    }

    /// Send one streaming request and time it. Never fails: failures are classified in the
    /// record. `run_start` anchors `start_s`; `timeout` bounds the whole request.
    pub async fn stream(
        &self,
        group: &str,
        prompt_id: &str,
        payload: &Payload,
        params: &GenParams,
        timeout: Duration,
        run_start: Instant,
    ) -> RequestRecord {
        let path = match payload {
            Payload::Chat(_) => "chat/completions",
            Payload::Text(_) | Payload::TokenIds(_) => "completions",
        };
        let url = format!("{}/{}", self.base_url, path);
        let body = self.body(payload, params);
        let t0 = Instant::now();
        let start_s = t0.duration_since(run_start).as_secs_f64();
        let deadline = tokio::time::Instant::from_std(t0 + timeout);
        let failed = |class: &str, detail: String| {
            let mut r = RequestRecord::failed(group, prompt_id, start_s, class, detail);
            r.e2e_s = t0.elapsed().as_secs_f64();
            r
        };

        let mut rb = self.http.post(&url).json(&body);
        if let Some(k) = &self.api_key {
            rb = rb.bearer_auth(k);
        }
        let resp = match tokio::time::timeout_at(deadline, rb.send()).await {
            Err(_) => return failed(ERR_TIMEOUT, format!("no response within {timeout:?}")),
            Ok(Err(e)) => return failed(classify_reqwest(&e), e.to_string()),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let text = tokio::time::timeout_at(deadline, resp.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return failed(
                &http_status_class(status.as_u16()),
                text.chars().take(300).collect(),
            );
        }

        let mut parser = SseParser::new();
        let mut bytes = resp.bytes_stream();
        let mut first_token: Option<Instant> = None;
        let mut last_token: Option<Instant> = None;
        let mut itl = Vec::new();
        let mut text_chunks = 0u64;
        let mut usage = None;
        let mut done = false;
        let mut failure: Option<(&str, String)> = None;

        'read: loop {
            let next = match tokio::time::timeout_at(deadline, bytes.next()).await {
                Err(_) => {
                    failure = Some((
                        ERR_TIMEOUT,
                        format!("stream not finished within {timeout:?}"),
                    ));
                    break;
                }
                Ok(n) => n,
            };
            let end_of_body = next.is_none();
            let events = match next {
                Some(Ok(b)) => parser.feed(&b),
                Some(Err(e)) => {
                    failure = Some((classify_reqwest(&e), e.to_string()));
                    break;
                }
                None => parser.finish().into_iter().collect(),
            };
            let now = Instant::now();
            for ev in events {
                match parse_chunk(&ev) {
                    Ok(Chunk::Done) => {
                        done = true;
                        break 'read;
                    }
                    Ok(Chunk::Error(msg)) => {
                        failure = Some((ERR_STREAM, msg));
                        break 'read;
                    }
                    Ok(Chunk::Data {
                        has_text, usage: u, ..
                    }) => {
                        if u.is_some() {
                            usage = u;
                        }
                        if has_text {
                            text_chunks += 1;
                            if first_token.is_none() {
                                first_token = Some(now);
                            }
                            if let Some(prev) = last_token {
                                itl.push(now.duration_since(prev).as_secs_f64());
                            }
                            last_token = Some(now);
                        }
                    }
                    Err(reason) => {
                        failure = Some((ERR_INVALID, reason));
                        break 'read;
                    }
                }
            }
            if end_of_body {
                break;
            }
        }
        let e2e = t0.elapsed().as_secs_f64();
        if failure.is_none() && !done {
            failure = Some((ERR_INCOMPLETE, "stream ended without [DONE]".into()));
        }

        let usage_tokens = usage.and_then(|u| u.completion_tokens);
        let output_tokens = usage_tokens.unwrap_or(text_chunks);
        let ttft = first_token.map(|t| t.duration_since(t0).as_secs_f64());
        let (tpot, decode) = match (first_token, last_token) {
            (Some(f), Some(l)) if output_tokens >= 2 && l > f => {
                let tpot = l.duration_since(f).as_secs_f64() / (output_tokens - 1) as f64;
                (Some(tpot), Some(1.0 / tpot))
            }
            _ => (None, None),
        };
        RequestRecord {
            group: group.to_string(),
            prompt_id: prompt_id.to_string(),
            start_s,
            ok: failure.is_none(),
            error: failure.as_ref().map(|(c, _)| c.to_string()),
            error_detail: failure.map(|(_, d)| d),
            ttft_s: ttft,
            e2e_s: e2e,
            output_tokens,
            prompt_tokens: usage.and_then(|u| u.prompt_tokens),
            usage_reported: usage_tokens.is_some(),
            text_chunks,
            tpot_s: tpot,
            decode_tok_s: decode,
            itl_s: itl,
        }
    }
}

fn classify_reqwest(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        ERR_TIMEOUT
    } else if e.is_decode() {
        ERR_INVALID
    } else {
        // connect refused/reset, body cut mid-stream, TLS: the transport failed.
        ERR_CONNECTION
    }
}

/// `http://host:8000/v1` -> `http://host:8000/metrics` (the server root, where vLLM serves it).
pub fn default_metrics_url(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    let root = base.strip_suffix("/v1").unwrap_or(base);
    format!("{root}/metrics")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        Endpoint::new("http://h:1/v1/", None, "m".into(), Duration::from_secs(1)).unwrap()
    }

    #[test]
    fn body_has_stream_usage_and_vllm_extensions() {
        let p = GenParams {
            max_tokens: 16,
            temperature: 0.0,
            ignore_eos: true,
            seed: Some(3),
            extra_body: Some(json!({"chat_template_kwargs": {"thinking": false}, "top_p": 0.9})),
        };
        let b = endpoint().body(&Payload::TokenIds(vec![5, 6]), &p);
        assert_eq!(b["prompt"], json!([5, 6]));
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["seed"], 3);
        assert_eq!(b["max_tokens"], 16);
        assert_eq!(b["chat_template_kwargs"]["thinking"], false);
        assert_eq!(b["top_p"], 0.9);
        let p = GenParams {
            ignore_eos: false,
            seed: None,
            extra_body: None,
            ..p
        };
        let b = endpoint().body(&Payload::Text("x".into()), &p);
        assert!(b.get("ignore_eos").is_none() && b.get("seed").is_none());
    }

    #[test]
    fn metrics_url_is_at_server_root() {
        assert_eq!(
            default_metrics_url("http://a:8000/v1/"),
            "http://a:8000/metrics"
        );
        assert_eq!(
            default_metrics_url("http://a:8000"),
            "http://a:8000/metrics"
        );
        assert_eq!(endpoint().base_url, "http://h:1/v1");
    }
}
