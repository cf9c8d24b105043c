//! `POST /v1/chat/completions`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::generate::{
    params_for_prompt, stream_choices, validate_common, ChoiceDelta, ChoiceStream, Generation,
    ResponseHead, TokenNames, Validated,
};
use super::types::*;
use super::{sse_response, AppState, JsonBody, Serving};
use crate::engine::tokenizer::chat::{encode_chat, ChatError, ChatOptions};
use crate::scheduler::TokenLogprobs;

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let serving = state.serving()?;
    state.check_model(req.common.model.as_deref())?;
    let limits = serving.scheduler.limits();
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (true, k) => Some(k.unwrap_or(0)),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ApiError::bad_param(
                "top_logprobs",
                "top_logprobs needs logprobs set to true",
            ))
        }
    };
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let v = validate_common(&req.common, max_tokens, logprobs, &limits)?;

    let mut tools = req.tools.clone().unwrap_or_default();
    match req.tool_choice.as_ref() {
        None => {}
        Some(serde_json::Value::String(s)) if s == "auto" => {}
        Some(serde_json::Value::String(s)) if s == "none" => tools.clear(),
        Some(other) => {
            return Err(ApiError::bad_param(
                "tool_choice",
                format!("tool_choice {other} is not supported; use \"auto\" or \"none\""),
            ))
        }
    }
    if let Some(rf) = &req.response_format {
        if rf.get("type").and_then(|t| t.as_str()) != Some("text") {
            return Err(ApiError::bad_param(
                "response_format",
                "only response_format {\"type\": \"text\"} is supported",
            ));
        }
    }
    let mut options = ChatOptions::default();
    if let Some(e) = &req.reasoning_effort {
        options.apply_reasoning_effort(e);
    }
    if let Some(kw) = &req.chat_template_kwargs {
        options.apply_template_kwargs(kw);
    }
    if let Some(b) = req.add_generation_prompt {
        options.add_generation_prompt = b;
    }
    if let Some(b) = req.continue_final_message {
        options.continue_final_message = b;
    }
    let prompt =
        encode_chat(&serving.tokenizer, &req.messages, &tools, &options).map_err(|e| match e {
            ChatError::Tokenizer(_) => ApiError::internal(e.to_string()),
            other => ApiError::bad_param("messages", other.to_string()),
        })?;
    let params = params_for_prompt(&v, prompt.len(), &limits)?;
    let gen = Generation::submit(&serving.scheduler, vec![(prompt, params)], arrival)?;
    let ctx = ChatCtx {
        head: ResponseHead::new("chatcmpl", &state.model_name),
        parse: (
            options.thinking && options.add_generation_prompt,
            !tools.is_empty(),
        ),
        v,
    };
    if ctx.v.stream {
        Ok(stream(serving, gen, ctx))
    } else {
        Ok(Json(complete(&serving, gen, &ctx).await?).into_response())
    }
}

struct ChatCtx {
    head: ResponseHead,
    /// (thinking, tools) for the output parser.
    parse: (bool, bool),
    v: Validated,
}

fn logprob_entry(names: &mut TokenNames<'_>, token: u32, lp: &TokenLogprobs) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: names.name(token),
        logprob: lp.logprob,
        bytes: names.bytes(token),
        top_logprobs: lp
            .top
            .iter()
            .map(|&(t, l)| TopLogprob {
                token: names.name(t),
                logprob: l,
                bytes: names.bytes(t),
            })
            .collect(),
    }
}

#[derive(Default)]
struct Collected {
    content: String,
    reasoning: String,
    tool_calls: Vec<ToolCallOut>,
    logprobs: Vec<ChatTokenLogprob>,
}

impl Collected {
    fn add(&mut self, d: ChoiceDelta) {
        self.content.push_str(&d.text);
        self.reasoning.push_str(&d.reasoning);
        for (_, id, name, arguments) in d.tool_calls {
            self.tool_calls.push(ToolCallOut {
                id,
                kind: "function",
                function: FunctionCallOut { name, arguments },
            });
        }
    }
}

async fn complete(
    serving: &Serving,
    gen: Generation,
    ctx: &ChatCtx,
) -> Result<ChatCompletionResponse, ApiError> {
    let tok = &serving.tokenizer;
    let mut names = TokenNames::new(tok, ctx.v.as_token_ids);
    let mut choices = ChoiceStream::new(gen, tok, &ctx.v, Some(ctx.parse));
    let mut out: Vec<Collected> = (0..choices.num_choices())
        .map(|_| Collected::default())
        .collect();
    while let Some(step) = choices.next().await? {
        let c = &mut out[step.choice];
        if let Some((token, lp)) = &step.logprobs {
            c.logprobs.push(logprob_entry(&mut names, *token, lp));
        }
        c.add(step.delta);
    }
    let message_choices = out
        .into_iter()
        .enumerate()
        .map(|(index, c)| ChatChoice {
            index,
            message: ChatMessageOut {
                role: "assistant",
                content: (!c.content.is_empty() || c.tool_calls.is_empty()).then_some(c.content),
                reasoning_content: (!c.reasoning.is_empty()).then_some(c.reasoning),
                tool_calls: c.tool_calls,
            },
            logprobs: ctx.v.params.logprobs.map(|_| ChatLogprobs {
                content: c.logprobs,
            }),
            finish_reason: choices.finish_reason(index),
        })
        .collect();
    Ok(ChatCompletionResponse {
        id: ctx.head.id.clone(),
        object: "chat.completion",
        created: ctx.head.created,
        model: ctx.head.model.clone(),
        choices: message_choices,
        usage: choices.usage(),
    })
}

fn stream(serving: Arc<Serving>, gen: Generation, ctx: ChatCtx) -> Response {
    sse_response(move |tx| async move {
        let tok = &serving.tokenizer;
        let mut names = TokenNames::new(tok, ctx.v.as_token_ids);
        let choices = ChoiceStream::new(gen, tok, &ctx.v, Some(ctx.parse));
        let mut tool_index = vec![0usize; choices.num_choices()];
        let chunk = |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| {
            Event::default().json_data(ChatCompletionChunk {
                id: ctx.head.id.clone(),
                object: "chat.completion.chunk",
                created: ctx.head.created,
                model: ctx.head.model.clone(),
                choices,
                usage,
            })
        };
        let first: Vec<ChatChunkChoice> = (0..choices.num_choices())
            .map(|index| ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    ..Default::default()
                },
                logprobs: None,
                finish_reason: None,
            })
            .collect();
        if tx.send(chunk(first, None)).await.is_err() {
            return;
        }
        stream_choices(&tx, choices, ctx.v.include_usage, chunk, |step| {
            let (choice, d) = (step.choice, step.delta);
            let lp = step.logprobs.map(|(token, lp)| ChatLogprobs {
                content: vec![logprob_entry(&mut names, token, &lp)],
            });
            let tool_calls: Vec<ToolCallDelta> = d
                .tool_calls
                .into_iter()
                .map(|(_, id, name, arguments)| {
                    let index = tool_index[choice];
                    tool_index[choice] += 1;
                    ToolCallDelta {
                        index,
                        call: ToolCallOut {
                            id,
                            kind: "function",
                            function: FunctionCallOut { name, arguments },
                        },
                    }
                })
                .collect();
            let has_delta = !d.text.is_empty() || !d.reasoning.is_empty() || !tool_calls.is_empty();
            if !has_delta && d.finish.is_none() && lp.is_none() {
                return None;
            }
            Some(ChatChunkChoice {
                index: choice,
                delta: ChatDelta {
                    role: None,
                    content: (!d.text.is_empty()).then_some(d.text),
                    reasoning_content: (!d.reasoning.is_empty()).then_some(d.reasoning),
                    tool_calls,
                },
                logprobs: lp,
                finish_reason: d.finish,
            })
        })
        .await;
    })
}
