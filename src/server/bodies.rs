//! Request bodies in: JSON parsed with errors in OpenAI's shape, every field of a generation request checked
//! (`fields::check_fields`), and chat messages rendered into a prompt.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use serde_json::Value;

use crate::backend::Backend;
use crate::server::fields::check_fields;
use crate::runtime::pipeline::ChatFallback;
use crate::server::openai::{render_model_template, Api, ApiError, ChatMessage, ChatTemplate};
use crate::server::state::AppState;

/// The prompt of chat messages as this server renders them.
pub(super) fn render_chat<B: Backend + 'static>(
    app: &AppState<B>,
    messages: &[ChatMessage],
) -> Result<(String, Vec<String>), ApiError> {
    let pipeline = app.service.pipeline();
    render_messages(app.template.as_ref(), pipeline.chat_template.as_ref(), pipeline.chat_fallback(), messages)
}

/// The prompt text of chat messages (images as markers) and their image URLs: `patterns` (`--chat-template`)
/// where given, else the model's Jinja template, else IDEFICS' format where the family takes it (`fallback`:
/// OpenFlamingo has no chat format, and its clients are told where its prompts go).
pub fn render_messages(
    patterns: Option<&ChatTemplate>,
    jinja: Option<&crate::io::chat_template::ChatTemplate>,
    fallback: ChatFallback,
    messages: &[ChatMessage],
) -> Result<(String, Vec<String>), ApiError> {
    match (patterns, jinja, fallback) {
        (Some(patterns), _, _) => patterns.render(messages),
        (None, Some(jinja), _) => render_model_template(jinja, messages),
        (None, None, ChatFallback::Idefics) => ChatTemplate::default().render(messages),
        (None, None, ChatFallback::None { family }) => Err(ApiError::bad(format!(
            "messages: this {family} model has no chat format; send its prompt (e.g. \
             `<image>caption<|endofchunk|><image>`) to /v1/completions, or start the server with --chat-template"
        ))),
    }
}

pub(super) fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// A generation request's body: a JSON object whose every field this server honours (`fields::check_fields`).
pub(super) fn parse_request<T: serde::de::DeserializeOwned>(
    api: Api,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    request_of(api, parse_body(body)?)
}

/// A generation request of `api` from its JSON body, every field checked (`fields::check_fields`).
pub fn request_of<T: serde::de::DeserializeOwned>(api: Api, value: Value) -> Result<T, ApiError> {
    let Value::Object(fields) = &value else {
        return Err(ApiError::bad("invalid request body: expected a JSON object"));
    };
    check_fields(api, fields)?;
    serde_json::from_value(value).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

