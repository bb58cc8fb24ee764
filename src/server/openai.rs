//! The OpenAI wire format: request bodies, the chat template that turns messages into an IDEFICS prompt, response
//! and stream-chunk bodies, and errors in OpenAI's shape.

use std::collections::HashMap;
use std::path::Path;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, where there is one.
    pub param: Option<String>,
    /// OpenAI's machine-readable code, where it has one for the case (`model_not_found`, `invalid_api_key`).
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying (a 429's `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// The client's fault (400).
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// The client's fault in request field `field` (400, the message starts with the field's name).
    pub fn field(field: &str, message: impl std::fmt::Display) -> Self {
        ApiError {
            param: Some(field.to_string()),
            ..ApiError::bad(format!("{field}: {message}"))
        }
    }

    /// The engine's fault (500).
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// The engine's own error: the client's fault when it is about the request (its prompt, images, parameters),
    /// the server's otherwise.
    pub fn from_engine(e: Error) -> Self {
        let status = match e {
            Error::Prompt(_)
            | Error::Image { .. }
            | Error::TokenOutOfRange { .. }
            | Error::Invalid(_)
            | Error::Tokenizer { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }

    /// OpenAI's error `type` for the status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            429 => "rate_limit_exceeded",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The body, `{"error": {...}}`.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param,
                         "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// `stop` is a string or a list of strings.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Generation fields shared by chat and completions requests (`server::fields` refuses any other field before
/// these are read); known fields of the wrong type are refused.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct GenerationFields {
    /// The served model's name (or absent); any other is a 404.
    pub model: Option<String>,
    #[serde(alias = "max_new_tokens")]
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; vLLM and TGI accept it.
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) to a bias in [-100, 100].
    pub logit_bias: Option<HashMap<String, f32>>,
    /// Chat: `true` / `false`; completions: how many top tokens (0 ..= 20).
    pub logprobs: Option<Value>,
    /// Chat only: top tokens per position with `logprobs: true`.
    pub top_logprobs: Option<usize>,
    /// Completions only: the prompt starts the text (and its log-probabilities, with `logprobs`).
    pub echo: Option<bool>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// The caller's end-user id, for its own tracking: changes nothing.
    pub user: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub fields: GenerationFields,
}

#[derive(Deserialize, Debug)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum ImageUrl {
    Object { url: String },
    Plain(String),
}

impl ImageUrl {
    pub fn url(&self) -> &str {
        match self {
            ImageUrl::Object { url } | ImageUrl::Plain(url) => url,
        }
    }
}

/// `POST /v1/completions`: a raw prompt with `<image>` markers; `images` (our extension) gives the image URLs in
/// marker order.
#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(flatten)]
    pub fields: GenerationFields,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

impl PromptField {
    pub fn single(self) -> std::result::Result<String, ApiError> {
        match self {
            PromptField::One(s) => Ok(s),
            PromptField::Many(mut v) if v.len() == 1 => Ok(v.remove(0)),
            PromptField::Many(v) => Err(ApiError::bad(format!(
                "prompt: {} prompts given; send one per request",
                v.len()
            ))),
        }
    }
}

/// How chat messages become a prompt: one pattern per role with `{content}` where the message goes (its images
/// as `<image>` markers), and the text that asks the model for the assistant's turn.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChatTemplate {
    pub system: String,
    pub user: String,
    pub assistant: String,
    pub generation_prompt: String,
}

impl Default for ChatTemplate {
    /// The IDEFICS instruct format: `User:<content><end_of_utterance>\nAssistant:`.
    fn default() -> Self {
        ChatTemplate {
            system: "System:{content}<end_of_utterance>\n".into(),
            user: "User:{content}<end_of_utterance>\n".into(),
            assistant: "Assistant:{content}<end_of_utterance>\n".into(),
            generation_prompt: "Assistant:".into(),
        }
    }
}

impl ChatTemplate {
    /// Reads a template from a JSON file with the four fields.
    pub fn from_file(path: &Path) -> Result<Self> {
        let t: ChatTemplate = crate::io::config::read_json(path)?;
        for (name, pattern) in [
            ("system", &t.system),
            ("user", &t.user),
            ("assistant", &t.assistant),
        ] {
            if !pattern.contains("{content}") {
                return Err(Error::config(path, name, "the pattern has no {content}"));
            }
        }
        Ok(t)
    }

    /// The prompt text (images as `<image>` markers) and the image URLs in marker order.
    pub fn render(
        &self,
        messages: &[ChatMessage],
    ) -> std::result::Result<(String, Vec<String>), ApiError> {
        if messages.is_empty() {
            return Err(ApiError::bad("messages: must not be empty"));
        }
        let mut prompt = String::new();
        let mut images = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let pattern = match m.role.as_str() {
                "system" | "developer" => &self.system,
                "user" => &self.user,
                "assistant" => &self.assistant,
                other => {
                    return Err(ApiError::bad(format!(
                        "messages[{i}].role: unknown role {other:?} (expected system, user or assistant)"
                    )))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => parts
                    .iter()
                    .map(|p| match p {
                        ContentPart::Text { text } => text.clone(),
                        ContentPart::ImageUrl { image_url } => {
                            images.push(image_url.url().to_string());
                            crate::io::tokenizer::IMAGE_TOKEN.to_string()
                        }
                    })
                    .collect(),
            };
            prompt.push_str(&pattern.replace("{content}", &content));
        }
        prompt.push_str(&self.generation_prompt);
        Ok((prompt, images))
    }
}

/// The prompt from the model's own Jinja chat template: messages in transformers' format (image parts as
/// `{"type": "image"}`, their URLs returned in order); a template that raises is the client's 400.
pub fn render_model_template(
    template: &crate::io::chat_template::ChatTemplate,
    messages: &[ChatMessage],
) -> std::result::Result<(String, Vec<String>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad("messages: must not be empty"));
    }
    let mut images = Vec::new();
    let hf: Vec<Value> = messages
        .iter()
        .map(|m| {
            let content = match &m.content {
                None => Value::String(String::new()),
                Some(Content::Text(t)) => Value::String(t.clone()),
                Some(Content::Parts(parts)) => parts
                    .iter()
                    .map(|p| match p {
                        ContentPart::Text { text } => json!({"type": "text", "text": text}),
                        ContentPart::ImageUrl { image_url } => {
                            images.push(image_url.url().to_string());
                            json!({"type": "image"})
                        }
                    })
                    .collect(),
            };
            json!({"role": m.role, "content": content})
        })
        .collect();
    let prompt = template
        .render(&Value::Array(hf), true, &serde_json::Map::new())
        .map_err(|e| ApiError::bad(e.to_string()))?;
    Ok((prompt, images))
}

/// Seconds since the Unix epoch, for `created`.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Which API a response belongs to: chat completions or completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}
