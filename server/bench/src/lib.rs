//! dspark-bench: a load benchmark for OpenAI-compatible endpoints (dspark or vLLM).
//!
//! Data flow: `cli` -> `scenarios` (traffic shape per scenario) -> `runner` (closed loop or
//! Poisson arrivals) -> `client` (one timed streaming request, parsed by `sse`) -> `report`
//! (`stats` summaries, JSON/CSV) and `plots` (PNG). `metrics` reads /metrics for acceptance
//! and RSS; `prompts` loads prompt sets and builds synthetic prompts.

pub mod cli;
pub mod client;
pub mod metrics;
pub mod plots;
pub mod prompts;
pub mod report;
pub mod runner;
pub mod scenarios;
pub mod sse;
pub mod stats;
