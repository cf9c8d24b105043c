//! The DSpark speculative-decoding draft of DeepSeek-V4 (see docs/DSPARK.md).
//!
//! - [`weights`]: the `mtp.{0,1,2}.*` tensors and `dspark_*` settings.
//! - [`ring`]: per-request draft state (a ring of `sliding_window` KV rows per stage), keyed by
//!   request id; only accepted positions are ever committed.
//! - [`propose`]: one drafting pass (block of `[anchor, noise x (k - 1)]`, three stages, shared
//!   LM head, sequential Markov head) giving `k` drafts and, when sampling, their distributions.
//! - [`accept`] / [`sampling`]: pure verification (greedy and rejection sampling).
pub mod accept;
pub mod sampling;

pub use accept::{verify, AcceptError, Verdict};
pub use sampling::{RequestRng, SamplingParams};
