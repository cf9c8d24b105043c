//! `/openapi.json`: an OpenAPI 3.1 description of the endpoints (the request/response bodies
//! follow OpenAI's published schema; only dspark/vLLM extensions are spelled out here).

use serde_json::{json, Value};

pub fn document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let gen_responses = json!({
        "200": {"description": "The completion (JSON), or a text/event-stream of chunks ending with `data: [DONE]` when `stream` is true.",
            "content": {
                "application/json": {"schema": {"type": "object",
                    "required": ["id", "object", "created", "model", "choices", "usage"],
                    "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                        "created": {"type": "integer"}, "model": {"type": "string"},
                        "choices": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["index", "finish_reason"]}},
                        "usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"]}}}},
                "text/event-stream": {"schema": {"type": "string"}}
            }},
        "400": {"description": "Invalid request", "content": {"application/json": {"schema": error}}},
        "401": {"description": "Missing or wrong API key", "content": {"application/json": {"schema": error}}},
        "404": {"description": "Unknown model", "content": {"application/json": {"schema": error}}},
        "413": {"description": "Body too large", "content": {"application/json": {"schema": error}}},
        "429": {"description": "Waiting queue full", "content": {"application/json": {"schema": error}}},
        "503": {"description": "Not ready or shutting down", "content": {"application/json": {"schema": error}}}
    });
    let extensions = json!({
        "top_k": {"type": "integer", "minimum": -1, "description": "-1 or 0: off"},
        "min_tokens": {"type": "integer", "minimum": 0},
        "ignore_eos": {"type": "boolean"},
        "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "return_tokens_as_token_ids": {"type": "boolean"},
        "include_stop_str_in_output": {"type": "boolean"},
        "skip_special_tokens": {"type": "boolean"}
    });
    let mut chat_props = json!({
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"],
            "properties": {"role": {"enum": ["system", "developer", "user", "assistant", "tool"]}}}},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer"},
        "n": {"type": "integer", "minimum": 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"enum": ["auto", "none"]},
        "chat_template_kwargs": {"type": "object", "properties": {"thinking": {"type": "boolean"}}},
        "reasoning_effort": {"type": "string"}
    });
    let mut completion_props = json!({
        "model": {"type": "string"},
        "prompt": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
            {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}}
        ]},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer"},
        "n": {"type": "integer", "minimum": 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "echo": {"type": "boolean"},
        "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}
    });
    for props in [&mut chat_props, &mut completion_props] {
        if let (Some(p), Some(e)) = (props.as_object_mut(), extensions.as_object()) {
            p.extend(e.clone());
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "dspark-server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI-compatible API for DeepSeek-V4-Flash with DSpark speculative decoding."
        },
        "paths": {
            "/v1/chat/completions": {"post": {
                "summary": "Chat completion (OpenAI), streaming or not",
                "security": [{"bearer": []}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["messages"], "properties": chat_props}}}},
                "responses": gen_responses.clone()
            }},
            "/v1/completions": {"post": {
                "summary": "Text completion (OpenAI legacy), streaming or not",
                "security": [{"bearer": []}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["prompt"], "properties": completion_props}}}},
                "responses": gen_responses
            }},
            "/v1/models": {"get": {"summary": "The served model", "security": [{"bearer": []}],
                "responses": {"200": {"description": "Model list", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["object", "data"],
                    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
                        "type": "object", "required": ["id", "object"]}}}}}}}}}},
            "/health": {"get": {"summary": "Process alive", "responses": {"200": {"description": "Alive"}}}},
            "/ready": {"get": {"summary": "Weights loaded, group formed, warm-up done",
                "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (vLLM names)",
                "responses": {"200": {"description": "text/plain; version=0.0.4"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}}
        },
        "components": {
            "schemas": {"Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}
                }}}
            }},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "Only when the server runs with --api-key; /health, /ready, /metrics stay open."}}
        }
    })
}
