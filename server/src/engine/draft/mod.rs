//! The DSpark speculative-decoding draft of DeepSeek-V4 (data flow and the scheduler's calls:
//! docs/DSPARK.md).
//!
//! - [`weights`]: the `mtp.{0,1,2}.*` tensors (all of them, or a named error) and settings.
//! - [`ring`]: per-request draft state (a ring of `sliding_window` KV rows per stage), keyed by
//!   request id; only accepted positions are ever committed.
//! - [`propose`]: [`DsparkDraft`]: `commit` target features, `propose` a block of drafts (and,
//!   when sampling, the distributions they were drawn from).
//! - [`accept`] / [`sampling`]: pure verification (greedy and rejection sampling) and the
//!   temperature / top-k / top-p transform shared by target and draft.
//! - [`stats`]: the counters behind vLLM's `spec_decode` metrics.
pub mod accept;
pub mod propose;
pub mod ring;
pub mod sampling;
pub mod stats;
pub mod weights;

pub use accept::{verify, AcceptError, Verdict};
pub use propose::{DraftError, Drafts, DsparkDraft, ProposeRequest};
pub use sampling::{RequestRng, SamplingParams};
pub use stats::SpecDecodeStats;
pub use weights::DEFAULT_NUM_STAGES;
