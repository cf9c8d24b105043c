//! OpenAI-compatible HTTP API (axum).
//!
//! `/v1/*` serve generations (behind the optional API key); `/health`, `/ready`, `/metrics`,
//! `/openapi.json` stay open. Until the engine is loaded ([`AppState::set_serving`]) generation
//! endpoints answer 503 and `/ready` is not ready; `/health` answers as soon as the process listens.

pub mod chat;
pub mod completions;
pub mod error;
pub mod generate;
pub mod openapi;
#[cfg(test)]
mod tests;
pub mod types;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::engine::tokenizer::Tokenizer;
use crate::metrics::Metrics;
use crate::scheduler::SchedulerHandle;
use error::ApiError;
use types::{ModelCard, ModelList};

/// What generation needs once the engine is up.
pub struct Serving {
    pub scheduler: SchedulerHandle,
    pub tokenizer: Tokenizer,
}

pub struct AppState {
    pub model_name: String,
    /// Shown as `root` in /v1/models.
    pub model_path: String,
    pub api_key: Option<String>,
    pub metrics: Arc<Metrics>,
    pub created: u64,
    serving: OnceLock<Arc<Serving>>,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(
        model_name: String,
        model_path: String,
        api_key: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Self {
        AppState {
            model_name,
            model_path,
            api_key,
            metrics,
            created: now_secs(),
            serving: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Marks the engine loaded and warmed up: generation endpoints open, /ready turns 200.
    pub fn set_serving(&self, serving: Serving) {
        let _ = self.serving.set(Arc::new(serving));
    }

    /// Stop admitting new generations (graceful shutdown).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn serving_handle(&self) -> Option<Arc<Serving>> {
        self.serving.get().cloned()
    }

    fn serving(&self) -> Result<Arc<Serving>, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::not_ready("the server is shutting down"));
        }
        let s = self
            .serving
            .get()
            .ok_or_else(|| ApiError::not_ready("the model is still loading"))?;
        if !s.scheduler.is_alive() {
            return Err(ApiError::not_ready("the engine has stopped"));
        }
        Ok(s.clone())
    }

    fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::SeqCst)
            && self.serving.get().is_some_and(|s| s.scheduler.is_alive())
    }

    /// A request naming another model is a 404, as in OpenAI and vLLM. Omitted `model` is fine.
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.model_name => Err(ApiError::model_not_found(m)),
            _ => Ok(()),
        }
    }
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        // After every route: it applies to the method routers registered so far.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        ApiError::not_ready(
            "not ready: the model is loading, the group is forming, or the server is stopping",
        )
        .into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn openapi_json() -> Json<serde_json::Value> {
    Json(openapi::document())
}

async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let max_model_len = state
        .serving
        .get()
        .map(|s| s.scheduler.limits().max_model_len);
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: "model",
            created: state.created,
            owned_by: "dspark",
            root: state.model_path.clone(),
            max_model_len,
        }],
    })
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::method_not_allowed(format!(
        "method {} is not allowed for {}",
        req.method(),
        req.uri().path()
    ))
}

/// A JSON body whose every failure is an OpenAI-shaped error: 413 past the body limit, 400 for
/// malformed JSON or wrong types (axum's own extractor answers 415/422 in plain text).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(format!("request body too large: {}", rej.body_text()))
            } else {
                ApiError::bad_request(format!("cannot read request body: {}", rej.body_text()))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}

/// An SSE response fed by `produce`, ended with `data: [DONE]` as OpenAI does. When the client
/// goes away the producer is dropped mid-await, which drops its scheduler receivers and so
/// cancels the request and frees its blocks.
pub fn sse_response<F, Fut>(produce: F) -> Response
where
    F: FnOnce(mpsc::Sender<Result<Event, axum::Error>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let fut = produce(tx.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = fut => {
                let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
            }
            _ = tx.closed() => {}
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// 24 random alphanumerics for response ids.
pub fn random_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

/// The probe endpoints of a follower rank (rank > 0): it serves no generations, but its pod has
/// the same liveness/readiness probes as rank 0's. `/ready` is 200 once `ready` is set (group
/// formed, shard loaded, following plans) and while the group is healthy.
pub fn follower_probe_router(ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route(
            "/ready",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.load(Ordering::Acquire) {
                        (StatusCode::OK, "ready").into_response()
                    } else {
                        ApiError::not_ready(
                            "not ready: the group is forming or the shard is loading",
                        )
                        .into_response()
                    }
                }
            }),
        )
        .fallback(|| async {
            ApiError::not_found("this is a follower rank: send requests to rank 0's service")
                .into_response()
        })
}
