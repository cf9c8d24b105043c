//! OpenAI-compatible HTTP API (axum).
