//! `POST /v1/completions`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::generate::{
    params_for_prompt, stream_choices, validate_common, ChoiceStream, Generation, ResponseHead,
    TokenNames, Validated,
};
use super::types::*;
use super::{sse_response, AppState, JsonBody, Serving};
use crate::scheduler::TokenLogprobs;

pub async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let serving = state.serving()?;
    state.check_model(req.common.model.as_deref())?;
    let limits = serving.scheduler.limits();
    if req.suffix.is_some() {
        return Err(ApiError::bad_param("suffix", "suffix is not supported"));
    }
    if req.echo && req.logprobs.is_some() {
        return Err(ApiError::bad_param(
            "echo",
            "echo together with logprobs is not supported",
        ));
    }
    let v = validate_common(&req.common, req.common.max_tokens, req.logprobs, &limits)?;
    let token_list = |ids: &[i64]| -> Result<Vec<u32>, ApiError> {
        ids.iter()
            .map(|&t| {
                if t < 0 || t as usize >= limits.vocab_size {
                    Err(ApiError::bad_param(
                        "prompt",
                        format!(
                            "token id {t} is out of vocabulary (size {})",
                            limits.vocab_size
                        ),
                    ))
                } else {
                    Ok(t as u32)
                }
            })
            .collect()
    };
    let encode = |text: &str| {
        serving
            .tokenizer
            .encode(text)
            .map_err(|e| ApiError::bad_param("prompt", e.to_string()))
    };
    let prompts: Vec<Vec<u32>> = match &req.prompt {
        PromptField::Text(t) => vec![encode(t)?],
        PromptField::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        PromptField::Tokens(ids) => vec![token_list(ids)?],
        PromptField::TokenLists(ls) => {
            ls.iter().map(|l| token_list(l)).collect::<Result<_, _>>()?
        }
    };
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(ApiError::bad_param("prompt", "the prompt is empty"));
    }
    if prompts.len() * v.params.n > limits.max_num_seqs {
        return Err(ApiError::bad_param(
            "n",
            format!(
                "{} prompts x n = {} choices exceed --max-num-seqs {}",
                prompts.len(),
                prompts.len() * v.params.n,
                limits.max_num_seqs
            ),
        ));
    }
    let echo: Vec<String> = if req.echo {
        prompts
            .iter()
            .map(|p| {
                serving
                    .tokenizer
                    .decode(p, v.skip_special)
                    .unwrap_or_default()
            })
            .collect()
    } else {
        Vec::new()
    };
    let jobs = prompts
        .into_iter()
        .map(|p| {
            let params = params_for_prompt(&v, p.len(), &limits)?;
            Ok((p, params))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let n = v.params.n;
    let gen = Generation::submit(&serving.scheduler, jobs, arrival)?;
    let ctx = CompletionCtx {
        head: ResponseHead::new("cmpl", &state.model_name),
        echo,
        n,
        v,
    };
    if ctx.v.stream {
        Ok(stream(serving, gen, ctx))
    } else {
        Ok(Json(complete(&serving, gen, &ctx).await?).into_response())
    }
}

struct CompletionCtx {
    head: ResponseHead,
    /// Prompt text per prompt, when `echo`.
    echo: Vec<String>,
    n: usize,
    v: Validated,
}

impl CompletionCtx {
    fn echo_for(&self, choice: usize) -> &str {
        self.echo.get(choice / self.n).map_or("", |s| s.as_str())
    }
}

/// Appends one token's logprobs in the completions (legacy) shape.
fn push_logprobs(
    lp: &mut CompletionLogprobs,
    names: &mut TokenNames<'_>,
    token: u32,
    t: &TokenLogprobs,
    offset: usize,
) {
    lp.tokens.push(names.name(token));
    lp.token_logprobs.push(t.logprob);
    lp.top_logprobs.push(
        t.top
            .iter()
            .map(|&(id, l)| (names.name(id), l))
            .collect::<HashMap<_, _>>(),
    );
    lp.text_offset.push(offset);
}

async fn complete(
    serving: &Serving,
    gen: Generation,
    ctx: &CompletionCtx,
) -> Result<CompletionResponse, ApiError> {
    let tok = &serving.tokenizer;
    let mut names = TokenNames::new(tok, ctx.v.as_token_ids);
    let mut choices = ChoiceStream::new(gen, tok, &ctx.v, None);
    let n = choices.num_choices();
    let mut out: Vec<String> = (0..n).map(|c| ctx.echo_for(c).to_string()).collect();
    let mut lps: Vec<CompletionLogprobs> = vec![CompletionLogprobs::default(); n];
    while let Some(step) = choices.next().await? {
        let text = &mut out[step.choice];
        if let Some((token, lp)) = &step.logprobs {
            push_logprobs(&mut lps[step.choice], &mut names, *token, lp, text.len());
        }
        text.push_str(&step.delta.text);
    }
    let text_choices = out
        .into_iter()
        .zip(lps)
        .enumerate()
        .map(|(index, (text, lp))| CompletionChoice {
            index,
            text,
            logprobs: ctx.v.params.logprobs.map(|_| lp),
            finish_reason: choices.finish_reason(index),
        })
        .collect();
    Ok(CompletionResponse {
        id: ctx.head.id.clone(),
        object: "text_completion",
        created: ctx.head.created,
        model: ctx.head.model.clone(),
        choices: text_choices,
        usage: Some(choices.usage()),
    })
}

fn stream(serving: Arc<Serving>, gen: Generation, ctx: CompletionCtx) -> Response {
    sse_response(move |tx| async move {
        let tok = &serving.tokenizer;
        let mut names = TokenNames::new(tok, ctx.v.as_token_ids);
        let choices = ChoiceStream::new(gen, tok, &ctx.v, None);
        let mut offsets = vec![0usize; choices.num_choices()];
        let chunk = |choices: Vec<CompletionChoice>, usage: Option<Usage>| {
            Event::default().json_data(CompletionResponse {
                id: ctx.head.id.clone(),
                object: "text_completion",
                created: ctx.head.created,
                model: ctx.head.model.clone(),
                choices,
                usage,
            })
        };
        if !ctx.echo.is_empty() {
            let first = (0..choices.num_choices())
                .map(|index| {
                    offsets[index] = ctx.echo_for(index).len();
                    CompletionChoice {
                        index,
                        text: ctx.echo_for(index).to_string(),
                        logprobs: None,
                        finish_reason: None,
                    }
                })
                .collect();
            if tx.send(chunk(first, None)).await.is_err() {
                return;
            }
        }
        stream_choices(&tx, choices, ctx.v.include_usage, chunk, |step| {
            let (choice, d) = (step.choice, step.delta);
            let lp = step.logprobs.map(|(token, t)| {
                let mut lp = CompletionLogprobs::default();
                push_logprobs(&mut lp, &mut names, token, &t, offsets[choice]);
                lp
            });
            if d.text.is_empty() && d.finish.is_none() && lp.is_none() {
                return None;
            }
            offsets[choice] += d.text.len();
            Some(CompletionChoice {
                index: choice,
                text: d.text,
                logprobs: lp,
                finish_reason: d.finish,
            })
        })
        .await;
    })
}
