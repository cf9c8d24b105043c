//! What the API hands the scheduler, and what comes back per request.

use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Sampling and stopping rules of one request, already validated by the API.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1 means off.
    pub top_p: f32,
    /// 0 means off.
    pub top_k: usize,
    /// Same seed, same output. Choice `i` of a request with `n > 1` draws from `seed + i`.
    pub seed: Option<u64>,
    /// Added to the logits before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// EOS and stop token ids are masked until this many tokens were generated.
    pub min_tokens: usize,
    /// Output tokens at most (already clipped to the request's ceiling by the API).
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    /// `Some(k)`: return the chosen token's logprob and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Independent completions of the same prompt.
    pub n: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            logit_bias: Vec::new(),
            min_tokens: 0,
            max_tokens: 16,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            logprobs: None,
            n: 1,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        }
    }
}

/// One generation request: `n` sequences sharing a prompt.
#[derive(Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// When the API received it (queue time and TTFT are measured from here).
    pub arrival: Instant,
    /// Where the request's tokens go. Dropping the receiver cancels the request.
    pub events: UnboundedSender<SeqEvent>,
}

impl GenerateRequest {
    /// A request and the receiver of its events.
    pub fn new(
        prompt: Vec<u32>,
        params: SamplingParams,
        arrival: Instant,
    ) -> (GenerateRequest, UnboundedReceiver<SeqEvent>) {
        let (events, rx) = unbounded_channel();
        let req = GenerateRequest {
            prompt,
            params,
            arrival,
            events,
        };
        (req, rx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop token id (or, decided by the API, a stop string).
    Stop,
    /// max_tokens or the max_model_len ceiling.
    Length,
    /// Cancelled: client gone, abort, or shutdown.
    Abort,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the chosen token under the model's distribution.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    /// The token that carries this finish is EOS or a stop token id: it counts as generated
    /// but is not part of the text.
    pub by_stop_token: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    Token {
        /// Choice index within the request.
        index: usize,
        token: u32,
        logprobs: Option<TokenLogprobs>,
        /// Set on the last token of the choice.
        finish: Option<Finish>,
    },
    /// A choice ended without a new token (aborted, or the ceiling reached on resume).
    Finished { index: usize, reason: FinishReason },
    /// The engine failed; every choice of the request is over.
    Failed(String),
}
