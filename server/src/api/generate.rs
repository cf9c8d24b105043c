//! From validated parameters to scheduler requests, and from scheduler events to text.
//!
//! Shared by chat and completions: a [`Generation`] is one or more scheduler requests (one per
//! prompt) whose events arrive merged; each choice turns its tokens into text through a
//! [`ChoiceText`] (streaming detokenizer, stop strings, and for chat the reasoning/tool-call parser).
//! [`ChoiceStream`] joins the two into per-choice steps; [`stream_choices`] sends them as SSE
//! chunks. The endpoints only shape steps into their own response types.

use std::collections::HashMap;
use std::time::Instant;

use axum::response::sse::Event;
use futures::stream::{select_all, SelectAll};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::error::ApiError;
use super::types::{CommonParams, Usage};
use super::{now_secs, random_id};
use crate::engine::tokenizer::parse::{OutputEvent, OutputParser};
use crate::engine::tokenizer::{IncrementalDecoder, StopStrings, Tokenizer};
use crate::scheduler::handle::Limits;
use crate::scheduler::{FinishReason, SamplingParams, SchedulerHandle, SeqEvent, TokenLogprobs};

/// The most alternatives per token a request may ask for (vLLM's default max_logprobs).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Parameters after validation, before the prompt length is known.
#[derive(Debug, Clone)]
pub struct Validated {
    pub params: SamplingParams,
    /// Explicit max_tokens, if any (else: fill to the ceiling).
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub include_stop: bool,
    pub skip_special: bool,
    pub as_token_ids: bool,
    pub stream: bool,
    pub include_usage: bool,
}

/// Checks the fields chat and completions share. `logprobs` is the already-read top-k.
pub fn validate_common(
    c: &CommonParams,
    max_tokens: Option<i64>,
    logprobs: Option<i64>,
    limits: &Limits,
) -> Result<Validated, ApiError> {
    let temperature = c.temperature.unwrap_or(1.0);
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(ApiError::bad_param(
            "temperature",
            format!("temperature must be non-negative, got {temperature}"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_param(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match c.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => {
            return Err(ApiError::bad_param(
                "top_k",
                format!("top_k must be -1 (off) or at least 1, got {k}"),
            ))
        }
    };
    let n = c.n.unwrap_or(1);
    if n < 1 || n as usize > limits.max_num_seqs {
        return Err(ApiError::bad_param(
            "n",
            format!(
                "n must be between 1 and {} (--max-num-seqs), got {n}",
                limits.max_num_seqs
            ),
        ));
    }
    if let Some(b) = c.best_of {
        if b != n {
            return Err(ApiError::bad_param(
                "best_of",
                "best_of other than n is not supported",
            ));
        }
    }
    let max_tokens = match max_tokens {
        None => None,
        Some(m) if m >= 1 => Some(m as usize),
        Some(m) => {
            return Err(ApiError::bad_param(
                "max_tokens",
                format!("max_tokens must be at least 1, got {m}"),
            ))
        }
    };
    let min_tokens = c.min_tokens.unwrap_or(0);
    if min_tokens < 0 || max_tokens.is_some_and(|m| min_tokens as usize > m) {
        return Err(ApiError::bad_param(
            "min_tokens",
            format!("min_tokens must be between 0 and max_tokens, got {min_tokens}"),
        ));
    }
    for (name, v) in [
        ("presence_penalty", c.presence_penalty.unwrap_or(0.0)),
        ("frequency_penalty", c.frequency_penalty.unwrap_or(0.0)),
        (
            "repetition_penalty",
            c.repetition_penalty.unwrap_or(1.0) - 1.0,
        ),
    ] {
        if v != 0.0 {
            return Err(ApiError::bad_param(
                match name {
                    "presence_penalty" => "presence_penalty",
                    "frequency_penalty" => "frequency_penalty",
                    _ => "repetition_penalty",
                },
                format!("{name} is not supported by this server"),
            ));
        }
    }
    let vocab = limits.vocab_size;
    let token_id = |field: &'static str, t: i64| {
        if t < 0 || t as usize >= vocab {
            Err(ApiError::bad_param(
                field,
                format!("token id {t} is out of vocabulary (size {vocab})"),
            ))
        } else {
            Ok(t as u32)
        }
    };
    let stop_token_ids = c
        .stop_token_ids
        .iter()
        .flatten()
        .map(|&t| token_id("stop_token_ids", t))
        .collect::<Result<Vec<_>, _>>()?;
    let mut logit_bias = Vec::new();
    for (k, &v) in c.logit_bias.iter().flatten() {
        let t: i64 = k.parse().map_err(|_| {
            ApiError::bad_param(
                "logit_bias",
                format!("logit_bias key {k:?} is not a token id"),
            )
        })?;
        if !v.is_finite() {
            return Err(ApiError::bad_param(
                "logit_bias",
                "logit_bias values must be finite",
            ));
        }
        logit_bias.push((token_id("logit_bias", t)?, v.clamp(-100.0, 100.0)));
    }
    logit_bias.sort_by_key(|b| b.0);
    let logprobs = match logprobs {
        None => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::bad_param(
                "logprobs",
                format!("the number of logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            ))
        }
    };
    if c.stream_options.is_some() && !c.stream {
        return Err(ApiError::bad_param(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    Ok(Validated {
        params: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: c.seed.map(|s| s as u64),
            logit_bias,
            min_tokens: min_tokens as usize,
            max_tokens: 0,
            ignore_eos: c.ignore_eos.unwrap_or(false),
            stop_token_ids,
            logprobs,
            n: n as usize,
        },
        max_tokens,
        stop: c.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        include_stop: c.include_stop_str_in_output,
        skip_special: c.skip_special_tokens.unwrap_or(true),
        as_token_ids: c.return_tokens_as_token_ids,
        stream: c.stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// The final SamplingParams for a prompt: max_tokens omitted means fill to the ceiling;
/// anything over the ceiling is a 400 now, not a truncation later.
pub fn params_for_prompt(
    v: &Validated,
    prompt_len: usize,
    limits: &Limits,
) -> Result<SamplingParams, ApiError> {
    let ceiling = limits.max_model_len;
    if prompt_len >= ceiling {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {ceiling} tokens. However, your prompt has \
             {prompt_len} tokens, which leaves no room for output. Please reduce the length of \
             the messages or prompt."
        )));
    }
    let max_tokens = v.max_tokens.unwrap_or(ceiling - prompt_len);
    if prompt_len + max_tokens > ceiling {
        return Err(ApiError::bad_param(
            "max_tokens",
            format!(
                "This model's maximum context length is {ceiling} tokens. However, you requested \
                 {} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). Please \
                 reduce the length of the prompt or max_tokens.",
                prompt_len + max_tokens
            ),
        ));
    }
    if v.params.min_tokens > max_tokens {
        return Err(ApiError::bad_param(
            "min_tokens",
            "min_tokens exceeds max_tokens",
        ));
    }
    Ok(SamplingParams {
        max_tokens,
        ..v.params.clone()
    })
}

/// What every response object (and stream chunk) of one request repeats.
pub struct ResponseHead {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseHead {
    /// A fresh id `{id_prefix}-<random>`, created now.
    pub fn new(id_prefix: &str, model: &str) -> Self {
        ResponseHead {
            id: format!("{id_prefix}-{}", random_id()),
            created: now_secs(),
            model: model.to_string(),
        }
    }
}

/// An event of a generation, with its choice index across all prompts.
#[derive(Debug)]
pub enum ChoiceEvent {
    Token {
        choice: usize,
        token: u32,
        logprobs: Option<TokenLogprobs>,
        finish: Option<(FinishReason, bool)>,
    },
    Finished {
        choice: usize,
        reason: FinishReason,
    },
    Failed(String),
}

/// One or more submitted requests; dropping it cancels them all.
pub struct Generation {
    handle: SchedulerHandle,
    /// (scheduler request id, first choice index, n) per prompt.
    requests: Vec<(u64, usize, usize)>,
    events: SelectAll<futures::stream::BoxStream<'static, (usize, SeqEvent)>>,
    pub prompt_tokens: usize,
    pub num_choices: usize,
}

impl Generation {
    pub fn submit(
        handle: &SchedulerHandle,
        prompts: Vec<(Vec<u32>, SamplingParams)>,
        arrival: Instant,
    ) -> Result<Generation, ApiError> {
        let mut requests = Vec::new();
        let mut streams = Vec::new();
        let mut next_choice = 0;
        let mut prompt_tokens = 0;
        for (i, (prompt, params)) in prompts.into_iter().enumerate() {
            let n = params.n;
            prompt_tokens += prompt.len();
            // On error the receivers submitted so far are dropped here, cancelling them.
            let (id, rx) = handle.submit(prompt, params, arrival)?;
            requests.push((id, next_choice, n));
            streams.push(
                UnboundedReceiverStream::new(rx)
                    .map(move |e| (i, e))
                    .boxed(),
            );
            next_choice += n;
        }
        Ok(Generation {
            handle: handle.clone(),
            requests,
            events: select_all(streams),
            prompt_tokens,
            num_choices: next_choice,
        })
    }

    /// The next event; `None` once every request's channel closed.
    pub async fn next(&mut self) -> Option<ChoiceEvent> {
        let (i, ev) = self.events.next().await?;
        let base = self.requests[i].1;
        Some(match ev {
            SeqEvent::Token {
                index,
                token,
                logprobs,
                finish,
            } => ChoiceEvent::Token {
                choice: base + index,
                token,
                logprobs,
                finish: finish.map(|f| (f.reason, f.by_stop_token)),
            },
            SeqEvent::Finished { index, reason } => ChoiceEvent::Finished {
                choice: base + index,
                reason,
            },
            SeqEvent::Failed(m) => ChoiceEvent::Failed(m),
        })
    }

    /// Stops one choice early (a stop string matched).
    pub fn abort_choice(&self, choice: usize) {
        if let Some(&(id, base, _)) = self
            .requests
            .iter()
            .find(|(_, base, n)| choice >= *base && choice < base + n)
        {
            self.handle.abort(id, Some(choice - base));
        }
    }
}

/// Why a generation's events ended before every choice finished.
#[derive(Debug)]
pub enum Interrupted {
    /// The engine failed the request.
    Failed(String),
    /// The scheduler closed the request's channels (it stopped).
    Closed,
}

impl From<Interrupted> for ApiError {
    fn from(e: Interrupted) -> ApiError {
        match e {
            Interrupted::Failed(m) => ApiError::internal(m),
            Interrupted::Closed => {
                ApiError::internal("the engine stopped before the request finished")
            }
        }
    }
}

/// What one event added to one choice.
#[derive(Debug)]
pub struct ChoiceStep {
    pub choice: usize,
    pub delta: ChoiceDelta,
    /// The sampled token and its logprobs, when the request asked for logprobs.
    pub logprobs: Option<(u32, TokenLogprobs)>,
}

/// A generation's choices as text: scheduler events in, per-choice steps out, stop strings
/// aborting their choice in the scheduler.
pub struct ChoiceStream {
    gen: Generation,
    texts: Vec<ChoiceText>,
}

impl ChoiceStream {
    /// `parser`: `Some((thinking, tools))` for chat.
    pub fn new(
        gen: Generation,
        tok: &Tokenizer,
        v: &Validated,
        parser: Option<(bool, bool)>,
    ) -> Self {
        let texts = (0..gen.num_choices)
            .map(|_| ChoiceText::new(tok, v, parser))
            .collect();
        ChoiceStream { gen, texts }
    }

    pub fn num_choices(&self) -> usize {
        self.texts.len()
    }

    /// The next step of an unfinished choice; `Ok(None)` once every choice finished.
    pub async fn next(&mut self) -> Result<Option<ChoiceStep>, Interrupted> {
        while self.texts.iter().any(|t| t.finished.is_none()) {
            match self.gen.next().await {
                Some(ChoiceEvent::Token {
                    choice,
                    token,
                    logprobs,
                    finish,
                }) => {
                    if self.texts[choice].finished.is_some() {
                        continue;
                    }
                    let (delta, stop_hit) = self.texts[choice].push(token, finish);
                    if stop_hit {
                        self.gen.abort_choice(choice);
                    }
                    return Ok(Some(ChoiceStep {
                        choice,
                        delta,
                        logprobs: logprobs.map(|lp| (token, lp)),
                    }));
                }
                Some(ChoiceEvent::Finished { choice, reason }) => {
                    return Ok(Some(ChoiceStep {
                        choice,
                        delta: self.texts[choice].end(reason),
                        logprobs: None,
                    }))
                }
                Some(ChoiceEvent::Failed(m)) => return Err(Interrupted::Failed(m)),
                None => return Err(Interrupted::Closed),
            }
        }
        Ok(None)
    }

    /// The finish reason of `choice`, once it finished.
    pub fn finish_reason(&self, choice: usize) -> Option<&'static str> {
        self.texts[choice].finished
    }

    /// Prompt and completion tokens so far, over all choices.
    pub fn usage(&self) -> Usage {
        let completion_tokens = self.texts.iter().map(|t| t.completion_tokens).sum();
        Usage::new(self.gen.prompt_tokens, completion_tokens)
    }
}

/// Sends a generation's steps as SSE chunks until every choice finished: `chunk` wraps choices
/// (and usage) in the endpoint's chunk object; `step_choice` shapes a step into a chunk choice,
/// `None` when there is nothing to send. An engine failure goes out as an error event; a usage
/// chunk closes the stream when the request asked for one. Stops when the client is gone.
pub async fn stream_choices<C>(
    tx: &mpsc::Sender<Result<Event, axum::Error>>,
    mut choices: ChoiceStream,
    include_usage: bool,
    chunk: impl Fn(Vec<C>, Option<Usage>) -> Result<Event, axum::Error>,
    mut step_choice: impl FnMut(ChoiceStep) -> Option<C>,
) {
    loop {
        let step = match choices.next().await {
            Ok(Some(step)) => step,
            Ok(None) => break,
            Err(Interrupted::Failed(m)) => {
                let _ = tx
                    .send(Event::default().json_data(ApiError::internal(m).body()))
                    .await;
                return;
            }
            Err(Interrupted::Closed) => return,
        };
        let Some(c) = step_choice(step) else {
            continue;
        };
        if tx.send(chunk(vec![c], None)).await.is_err() {
            return;
        }
    }
    if include_usage {
        let _ = tx.send(chunk(vec![], Some(choices.usage()))).await;
    }
}

/// What one token added to a choice.
#[derive(Debug, Default)]
pub struct ChoiceDelta {
    pub text: String,
    pub reasoning: String,
    /// (index within the message, id, name, arguments JSON)
    pub tool_calls: Vec<(usize, String, String, String)>,
    /// Set when this token ended the choice.
    pub finish: Option<&'static str>,
}

/// Per-choice text pipeline: tokens -> text deltas -> stop strings -> (chat) parsed parts.
pub struct ChoiceText {
    decoder: IncrementalDecoder,
    stops: StopStrings,
    parser: Option<OutputParser>,
    pub completion_tokens: usize,
    pub finished: Option<&'static str>,
    saw_tool_call: bool,
}

impl ChoiceText {
    /// `parser`: `Some((thinking, tools))` for chat.
    pub fn new(tok: &Tokenizer, v: &Validated, parser: Option<(bool, bool)>) -> Self {
        ChoiceText {
            decoder: IncrementalDecoder::new(tok, v.skip_special),
            stops: StopStrings::new(v.stop.clone(), v.include_stop),
            parser: parser.map(|(thinking, tools)| OutputParser::new(thinking, tools)),
            completion_tokens: 0,
            finished: None,
            saw_tool_call: false,
        }
    }

    /// Feeds one generated token. Returns what it added, and whether a stop string just
    /// ended the choice (the caller then aborts it in the scheduler).
    pub fn push(
        &mut self,
        token: u32,
        finish: Option<(FinishReason, bool)>,
    ) -> (ChoiceDelta, bool) {
        let mut d = ChoiceDelta::default();
        if self.finished.is_some() {
            return (d, false);
        }
        self.completion_tokens += 1;
        let by_stop_token = finish.is_some_and(|f| f.1);
        let mut text = if by_stop_token {
            String::new()
        } else {
            self.decoder.push(token).unwrap_or_default()
        };
        if finish.is_some() {
            text.push_str(&self.decoder.finish());
        }
        let mut emitted = self.stops.push(&text);
        let stop_hit = self.stops.stopped().is_some();
        let reason = if stop_hit {
            Some(FinishReason::Stop)
        } else {
            if finish.is_some() {
                emitted.push_str(&self.stops.finish());
            }
            finish.map(|f| f.0)
        };
        self.route(&emitted, reason.is_some(), &mut d);
        if let Some(r) = reason {
            self.finish_with(r, &mut d);
        }
        (d, stop_hit)
    }

    /// The choice ended without a token (abort, failure).
    pub fn end(&mut self, reason: FinishReason) -> ChoiceDelta {
        let mut d = ChoiceDelta::default();
        if self.finished.is_some() {
            return d;
        }
        let mut rest = self.decoder.finish();
        rest = self.stops.push(&rest);
        if self.stops.stopped().is_none() {
            rest.push_str(&self.stops.finish());
        }
        self.route(&rest, true, &mut d);
        self.finish_with(reason, &mut d);
        d
    }

    fn route(&mut self, text: &str, last: bool, d: &mut ChoiceDelta) {
        let Some(p) = self.parser.as_mut() else {
            d.text.push_str(text);
            return;
        };
        let mut events = p.feed(text);
        if last {
            events.extend(p.finish());
        }
        for e in events {
            match e {
                OutputEvent::Reasoning(s) => d.reasoning.push_str(&s),
                OutputEvent::Content(s) => d.text.push_str(&s),
                OutputEvent::ToolCall {
                    index,
                    id,
                    name,
                    arguments_json,
                } => {
                    self.saw_tool_call = true;
                    d.tool_calls.push((index, id, name, arguments_json));
                }
            }
        }
    }

    fn finish_with(&mut self, reason: FinishReason, d: &mut ChoiceDelta) {
        let r = match reason {
            FinishReason::Stop if self.saw_tool_call => "tool_calls",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        };
        self.finished = Some(r);
        d.finish = Some(r);
    }
}

/// Token strings for logprobs, cached per id (logprob lists repeat ids a lot).
pub struct TokenNames<'a> {
    tok: &'a Tokenizer,
    as_ids: bool,
    cache: HashMap<u32, String>,
}

impl<'a> TokenNames<'a> {
    pub fn new(tok: &'a Tokenizer, as_ids: bool) -> Self {
        TokenNames {
            tok,
            as_ids,
            cache: HashMap::new(),
        }
    }
    pub fn name(&mut self, id: u32) -> String {
        let (tok, as_ids) = (self.tok, self.as_ids);
        self.cache
            .entry(id)
            .or_insert_with(|| tok.token_repr(id, as_ids).unwrap_or_default())
            .clone()
    }
    pub fn bytes(&self, id: u32) -> Vec<u8> {
        self.tok
            .token_bytes(id)
            .map(|b| b.to_vec())
            .unwrap_or_default()
    }
}
