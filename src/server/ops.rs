//! What operating a server needs beside generation: the API key, CORS, OpenAI-shaped bodies for every 404 / 405,
//! responses counted by status for `/metrics`, `GET /v1/models/{id}`, and vLLM's `POST /tokenize` and
//! `POST /detokenize`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use crate::backend::Backend;
use crate::io::tokenizer::{IMAGE_TOKEN, MLLAMA_IMAGE_TOKEN};
use crate::server::openai::{ApiError, ChatMessage};
use crate::server::state::AppState;
use crate::server::bodies::{parse_body, render_chat};

/// Refuses a request without the server's API key (when it has one) with OpenAI's 401.
pub async fn require_api_key<B: Backend + 'static>(
    State(app): State<Arc<AppState<B>>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(key) = &app.access.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| same_bytes(g.as_bytes(), key.as_bytes())) {
        return next.run(req).await;
    }
    let message = match given {
        None => "no API key given: send the header `Authorization: Bearer <key>`",
        Some(_) => "incorrect API key provided",
    };
    ApiError {
        code: Some("invalid_api_key"),
        ..ApiError::new(StatusCode::UNAUTHORIZED, message)
    }
    .into_response()
}

/// Equality in time that does not depend on where the first difference is.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts every response by status (for `/metrics`).
pub async fn count_responses<B: Backend + 'static>(
    State(app): State<Arc<AppState<B>>>,
    req: Request,
    next: Next,
) -> Response {
    let response = next.run(req).await;
    let code = response.status().as_u16();
    *app.responses
        .lock()
        .expect("metrics lock")
        .entry(code)
        .or_default() += 1;
    response
}

/// The CORS layer for `origins` (`*`: any), or `None` when there are none.
pub fn cors(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = match origins.iter().any(|o| o == "*") {
        true => AllowOrigin::any(),
        false => AllowOrigin::list(
            origins
                .iter()
                .map(|o| {
                    HeaderValue::from_str(o)
                        .map_err(|_| format!("--cors-allow-origin: {o:?} is not a valid origin"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(Any)
            .max_age(std::time::Duration::from_secs(600)),
    ))
}

pub async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {method} {}", uri.path()),
    )
}

pub async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

/// The 404 of a model this server does not serve.
pub fn unknown_model(name: &str, served: &str) -> ApiError {
    ApiError {
        param: Some("model".into()),
        code: Some("model_not_found"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model `{name}` does not exist; this server serves `{served}`"),
        )
    }
}

/// The served model as `/v1/models` lists it.
pub fn model_object(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "flamingo"})
}

pub async fn model<B: Backend + 'static>(
    State(app): State<Arc<AppState<B>>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match id == app.model_name {
        true => Ok(Json(model_object(&app.model_name))),
        false => Err(unknown_model(&id, &app.model_name)),
    }
}

/// vLLM's tokenize body: a prompt, or chat messages rendered as `/v1/chat/completions` renders them.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
}

/// `POST /tokenize`: `{"count", "max_model_len", "tokens", "token_strs"}`, the ids exactly as a generation of the
/// same prompt would run them (BOS and image tokens included).
pub async fn tokenize<B: Backend + 'static>(
    State(app): State<Arc<AppState<B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = parse_body(body)?;
    check_model(&app, req.model.as_deref())?;
    let text = match (req.prompt, req.messages) {
        (Some(p), None) => p,
        (None, Some(m)) => render_chat(&app, &m)?.0,
        _ => return Err(ApiError::bad("give one of prompt or messages")),
    };
    let p = app.service.pipeline();
    let images = text.matches(IMAGE_TOKEN).count() + text.matches(MLLAMA_IMAGE_TOKEN).count();
    let encoded = p.prompt_for(&text, images).map_err(ApiError::from_engine)?;
    let token_strs: Vec<String> = encoded.ids.iter().map(|&id| p.tokenizer.token(id)).collect();
    Ok(Json(json!({
        "count": encoded.ids.len(),
        "max_model_len": p.model().context_len(),
        "tokens": encoded.ids,
        "token_strs": token_strs,
    })))
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

/// `POST /detokenize`: `{"prompt"}`, special tokens kept; an id outside the vocabulary is a 400 naming it.
pub async fn detokenize<B: Backend + 'static>(
    State(app): State<Arc<AppState<B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeRequest = parse_body(body)?;
    check_model(&app, req.model.as_deref())?;
    let tok = &app.service.pipeline().tokenizer;
    let vocab = tok.vocab_size();
    if let Some((i, id)) = req.tokens.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(ApiError::field(
            "tokens",
            format!("tokens[{i}] = {id} is outside the vocabulary (0 .. {vocab})"),
        ));
    }
    let prompt = tok.decode(&req.tokens, false).map_err(ApiError::from_engine)?;
    Ok(Json(json!({ "prompt": prompt })))
}

/// A request's `model` must be the served one (or absent).
pub fn check_model<B: Backend + 'static>(
    app: &AppState<B>,
    model: Option<&str>,
) -> Result<(), ApiError> {
    match model {
        Some(m) if m != app.model_name => Err(unknown_model(m, &app.model_name)),
        _ => Ok(()),
    }
}
