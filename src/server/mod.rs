//! The OpenAI-compatible HTTP server (axum): `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics`. Requests are prepared (images fetched and decoded, prompt tokenized) on blocking
//! threads, then share the continuous-batching engine through [`EngineService`]. A response stream dropped by its
//! client cancels the request in the engine.

pub mod connections;
pub mod images;
mod metrics;
pub mod openai;
mod state;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::ReceiverStream;

use crate::backend::Backend;
use crate::model::sampling::SamplingParams;
use crate::runtime::request::{GenerationOutput, GenerationRequest};
use crate::runtime::service::StreamEvent;
use connections::{serve_connections, ConnectionLimits};
use openai::{
    render_model_template, Api, ApiError, ChatRequest, ChatTemplate, CompletionRequest, GenerationFields,
};
use state::Slot;
pub use state::{AppState, ServerLimits};

pub fn router<B: Backend + 'static>(state: Arc<AppState<B>>) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat::<B>))
        .route("/v1/completions", post(completions::<B>))
        .route("/v1/models", get(models::<B>))
        .route("/health", get(health))
        .route("/metrics", get(metrics::render::<B>))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models<B: Backend + 'static>(State(app): State<Arc<AppState<B>>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": app.model_name, "object": "model", "created": 0, "owned_by": "flamingo"}
    ]}))
}

async fn chat<B: Backend + 'static>(
    State(app): State<Arc<AppState<B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: ChatRequest = parse_body(body)?;
        let (prompt, urls) = match (&app.template, &app.service.pipeline().chat_template) {
            (Some(patterns), _) => patterns.render(&req.messages)?,
            (None, Some(jinja)) => render_model_template(jinja, &req.messages)?,
            (None, None) => ChatTemplate::default().render(&req.messages)?,
        };
        serve_request(&app, Api::Chat, prompt, urls, req.fields).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions<B: Backend + 'static>(
    State(app): State<Arc<AppState<B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: CompletionRequest = parse_body(body)?;
        let prompt = req.prompt.single()?;
        serve_request(&app, Api::Completions, prompt, req.images, req.fields).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError {
        status: e.status(),
        message: e.body_text(),
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// Sets its flag when dropped.
struct GoneOnDrop(Arc<AtomicBool>);

impl Drop for GoneOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Checks capacity and parameters, prepares the prompt and images off the async threads, submits, and answers
/// with one JSON body or an SSE stream.
async fn serve_request<B: Backend + 'static>(
    app: &Arc<AppState<B>>,
    api: Api,
    prompt: String,
    image_urls: Vec<String>,
    fields: GenerationFields,
) -> Result<Response, ApiError> {
    let slot = Slot::take(app)?;
    let (request, stream, include_usage) = generation_request(&fields, app.limits.max_tokens)?;
    let prepare_app = app.clone();
    // Set when this handler is dropped (hyper drops it when the client closes the connection): image loading,
    // which runs on a blocking thread, stops then instead of fetching for nobody.
    let gone = GoneOnDrop(Arc::new(AtomicBool::new(false)));
    let gone_flag = gone.0.clone();
    let (encoded, pixels) = tokio::task::spawn_blocking(move || {
        let pipeline = prepare_app.service.pipeline();
        // The prompt is checked before any image is fetched or decoded.
        let encoded = pipeline
            .prompt_for(&prompt, image_urls.len())
            .map_err(ApiError::from_engine)?;
        let pixels = (prepare_app.images).load_all(
            &image_urls,
            |image| pipeline.preprocessor.prepare(image),
            &gone_flag,
        )?;
        Ok::<_, ApiError>((encoded, pixels))
    })
    .await
    .map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("request preparation failed: {e}"),
    })??;
    let events = app
        .service
        .submit(encoded, pixels, request)
        .map_err(ApiError::from_engine)?;
    let id = format!(
        "{}-{}",
        if api == Api::Chat { "chatcmpl" } else { "cmpl" },
        app.next_id.fetch_add(1, Ordering::SeqCst)
    );
    if stream {
        Ok(stream_response(
            api,
            id,
            app.model_name.clone(),
            events,
            include_usage,
            slot,
        ))
    } else {
        let out = collect(events).await?;
        drop(slot);
        Ok(Json(api.response(&id, &app.model_name, &out)).into_response())
    }
}

/// The engine request from the OpenAI fields, and whether to stream (and to send usage at the end of a stream).
fn generation_request(
    f: &GenerationFields,
    max_tokens_limit: usize,
) -> Result<(GenerationRequest, bool, bool), ApiError> {
    if f.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("n: only n = 1 is supported"));
    }
    let max_new = f
        .max_completion_tokens
        .or(f.max_tokens)
        .unwrap_or(max_tokens_limit);
    if max_new > max_tokens_limit {
        return Err(ApiError::bad(format!(
            "max_tokens: {max_new} is over this server's limit of {max_tokens_limit}"
        )));
    }
    let d = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: f.temperature.unwrap_or(d.temperature),
        top_k: f.top_k.unwrap_or(d.top_k),
        top_p: f.top_p.unwrap_or(d.top_p),
        repetition_penalty: f.repetition_penalty.unwrap_or(d.repetition_penalty),
        seed: f.seed.unwrap_or(d.seed),
    };
    sampling.validate().map_err(ApiError::bad)?;
    let request = GenerationRequest {
        max_new_tokens: max_new,
        sampling,
        stop: f.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        ignore_eos: false,
    };
    let include_usage = f.stream_options.as_ref().is_some_and(|o| o.include_usage);
    Ok((request, f.stream, include_usage))
}

/// An error as the last event of a stream, in OpenAI's error shape.
fn stream_error(message: &str, kind: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

async fn collect(mut events: UnboundedReceiver<StreamEvent>) -> Result<GenerationOutput, ApiError> {
    while let Some(e) = events.recv().await {
        match e {
            StreamEvent::Text(_) => {}
            StreamEvent::Done(out) => return Ok(out),
            StreamEvent::Refused(message) => return Err(ApiError::bad(message)),
            StreamEvent::Failed(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: "the engine dropped the request".into(),
    })
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A forwarding task turns engine events
/// into SSE events; when the client goes away the SSE stream is dropped, the task's send fails, it drops the
/// engine receiver, and the engine cancels the request.
fn stream_response<B: Backend + 'static>(
    api: Api,
    id: String,
    model: String,
    mut events: UnboundedReceiver<StreamEvent>,
    include_usage: bool,
    slot: Slot<B>,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        // The request holds its place until its stream ends or its client leaves.
        let _slot = slot;
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(SseEvent::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        if api == Api::Chat && !send(api.chunk(&id, &model, None, None)).await {
            return;
        }
        while let Some(e) = events.recv().await {
            let alive = match e {
                StreamEvent::Text(t) => send(api.chunk(&id, &model, Some(&t), None)).await,
                StreamEvent::Done(out) => {
                    let finish = out.finish_reason.as_str();
                    let _ = send(api.chunk(&id, &model, None, Some(finish))).await
                        && (!include_usage || send(api.usage_chunk(&id, &model, &out)).await)
                        && tx
                            .send(Ok(SseEvent::default().data("[DONE]")))
                            .await
                            .is_ok();
                    return;
                }
                StreamEvent::Refused(message) => {
                    let _ = send(stream_error(&message, "invalid_request_error")).await;
                    return;
                }
                StreamEvent::Failed(message) => {
                    let _ = send(stream_error(&message, "server_error")).await;
                    return;
                }
            };
            if !alive {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}

/// Serves on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve<B: Backend + 'static>(
    listener: tokio::net::TcpListener,
    state: Arc<AppState<B>>,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_connections(listener, router(state), limits, shutdown).await
}
