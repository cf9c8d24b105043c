//! dspark-server: OpenAI-compatible serving of DeepSeek-V4-Flash with DSpark speculation.
//!
//! Data flows one way: `api` -> `scheduler` (+ `kv` block pool) -> `engine` -> `backend`.
//! `ranks` carries step plans from rank 0 to the other ranks and owns the communicator.

pub mod api;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod engine;
pub mod kv;
pub mod metrics;
pub mod ranks;
pub mod scheduler;
