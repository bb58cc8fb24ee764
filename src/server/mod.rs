//! The OpenAI-compatible HTTP server (axum): `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}`, `POST /tokenize`, `POST /detokenize`, `GET /health`, `GET /metrics`. Requests are prepared
//! (images fetched and decoded, prompt tokenized) on blocking threads, then share the continuous-batching engine
//! through [`EngineService`] (a request's `n` choices forked from one prefill). A response stream dropped by its
//! client cancels the request in the engine.

mod bodies;
pub mod choices;
pub mod connections;
pub mod fields;
pub mod images;
mod metrics;
pub mod openai;
mod ops;
mod state;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::middleware;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::{Sender, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;

use crate::backend::{Backend, TokenLogprobs};
use crate::io::image::PreparedImage;
use crate::io::prompt::EncodedPrompt;
use crate::runtime::request::GenerationOutput;
use crate::runtime::service::StreamEvent;
use choices::{usage, Choice, LogprobWriter};
use connections::{serve_connections, ConnectionLimits};
use fields::{MaxTokens, Plan};
use openai::{Api, ApiError, ChatRequest, CompletionRequest, GenerationFields};
use bodies::{parse_request, render_chat};
use state::Slot;
pub use bodies::{render_messages, request_of};
pub use state::{Access, AppState, ServerLimits};

pub fn router<B: Backend + 'static>(state: Arc<AppState<B>>) -> Router {
    let body_limit = state.limits.max_body_bytes;
    let guarded = Router::new()
        .route("/v1/chat/completions", post(chat::<B>))
        .route("/v1/completions", post(completions::<B>))
        .route("/v1/models", get(models::<B>))
        .route("/v1/models/{id}", get(ops::model::<B>))
        .route("/tokenize", post(ops::tokenize::<B>))
        .route("/detokenize", post(ops::detokenize::<B>))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            ops::require_api_key::<B>,
        ));
    let router = guarded
        .route("/health", get(health))
        .route("/metrics", get(metrics::render::<B>))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            ops::count_responses::<B>,
        ))
        .layer(DefaultBodyLimit::max(body_limit));
    // The origins were checked when the server started (`ops::cors` names a bad one).
    let router = match ops::cors(&state.access.cors_origins) {
        Ok(Some(cors)) => router.layer(cors),
        _ => router,
    };
    router.with_state(state)
}

/// Checks the CORS origins a server is to start with.
pub fn check_cors_origins(origins: &[String]) -> Result<(), String> {
    ops::cors(origins).map(|_| ())
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models<B: Backend + 'static>(State(app): State<Arc<AppState<B>>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [ops::model_object(&app.model_name)]}))
}

async fn chat<B: Backend + 'static>(
    State(app): State<Arc<AppState<B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: ChatRequest = parse_request(Api::Chat, body)?;
        ops::check_model(&app, req.fields.model.as_deref())?;
        let (prompt, urls) = render_chat(&app, &req.messages)?;
        serve_request(&app, Api::Chat, prompt, urls, req.fields).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions<B: Backend + 'static>(
    State(app): State<Arc<AppState<B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: CompletionRequest = parse_request(Api::Completions, body)?;
        ops::check_model(&app, req.fields.model.as_deref())?;
        let prompt = req.prompt.single()?;
        serve_request(&app, Api::Completions, prompt, req.images, req.fields).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// Sets its flag when dropped.
struct GoneOnDrop(Arc<AtomicBool>);

impl Drop for GoneOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What a response is built from beside the engine's events.
pub struct Answer {
    pub api: Api,
    pub id: String,
    pub model: String,
    /// Completions' `echo`: the prompt starts each choice's text (and its log-probabilities, when asked).
    pub echo: bool,
    /// Whether choices carry log-probabilities.
    pub logprobs: bool,
    /// Whether a stream ends with a usage chunk.
    pub include_usage: bool,
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
}

impl Answer {
    /// The answer to a request of `plan` (its choices apart) on `prompt`.
    pub fn new(api: Api, id: String, model: String, plan: &Plan, prompt_text: String, prompt_ids: Vec<u32>) -> Self {
        Answer {
            api,
            id,
            model,
            echo: plan.echo,
            logprobs: plan.logprobs,
            include_usage: plan.include_usage,
            prompt_text,
            prompt_ids,
        }
    }
}

/// Checks capacity and parameters, prepares the prompt and images off the async threads, submits one engine
/// request per choice, and answers with one JSON body or an SSE stream.
async fn serve_request<B: Backend + 'static>(
    app: &Arc<AppState<B>>,
    api: Api,
    prompt: String,
    image_urls: Vec<String>,
    fields: GenerationFields,
) -> Result<Response, ApiError> {
    let slot = Slot::take(app)?;
    let vocab = app.service.pipeline().tokenizer.vocab_size();
    let plan = fields::plan(api, &fields, vocab, MaxTokens::up_to(app.limits.max_tokens))?;
    let (encoded, pixels) = prepare(app, prompt.clone(), image_urls).await?;
    let receivers = app
        .service
        .submit_choices(encoded.clone(), pixels, plan.choices.clone())
        .map_err(ApiError::from_engine)?;
    let kind = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
    let id = app.response_id(kind);
    let answer = Answer::new(api, id, app.model_name.clone(), &plan, prompt, encoded.ids);
    if plan.stream {
        return Ok(stream_response(app.clone(), answer, receivers, slot));
    }
    let mut outputs = Vec::with_capacity(receivers.len());
    for events in receivers {
        outputs.push(collect(events).await?);
    }
    drop(slot);
    let body = answer.body(&app.service.pipeline().tokenizer, &outputs)?;
    Ok(Json(body).into_response())
}

/// The encoded prompt and the prepared images, on a blocking thread; image loading stops if the client leaves.
async fn prepare<B: Backend + 'static>(
    app: &Arc<AppState<B>>,
    prompt: String,
    image_urls: Vec<String>,
) -> Result<(EncodedPrompt, Vec<PreparedImage>), ApiError> {
    let prepare_app = app.clone();
    // Set when this handler is dropped (hyper drops it when the client closes the connection): image loading,
    // which runs on a blocking thread, stops then instead of fetching for nobody.
    let gone = GoneOnDrop(Arc::new(AtomicBool::new(false)));
    let gone_flag = gone.0.clone();
    let prepared = tokio::task::spawn_blocking(move || {
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
    .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))?;
    drop(gone);
    prepared
}

impl Answer {
    /// The whole response body of the choices' outputs (in choice order).
    pub fn body(
        &self,
        tok: &crate::io::tokenizer::Tokenizer,
        outputs: &[GenerationOutput],
    ) -> Result<Value, ApiError> {
        let choices = outputs
            .iter()
            .enumerate()
            .map(|(index, out)| self.choice(tok, index, out))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.api.response(&self.id, &self.model, &choices, usage(outputs)))
    }

    /// A finished choice of a whole response.
    pub fn choice(
        &self,
        tok: &crate::io::tokenizer::Tokenizer,
        index: usize,
        out: &GenerationOutput,
    ) -> Result<Choice, ApiError> {
        let text = match self.echo {
            true => format!("{}{}", self.prompt_text, out.text),
            false => out.text.clone(),
        };
        let logprobs = match self.logprobs {
            false => None,
            true => {
                let mut w = self.writer(tok);
                let mut tokens = Vec::new();
                if self.echo {
                    tokens.extend(prompt_entries(&out.prompt_ids, &out.prompt_logprobs));
                }
                tokens.extend(out.logprobs.iter().map(|l| (l.token, Some(l))));
                Some(w.write(&tokens).map_err(ApiError::from_engine)?)
            }
        };
        Ok(Choice {
            index,
            text,
            finish_reason: out.finish_reason.as_str(),
            logprobs,
        })
    }

    /// The log-probability writer of a choice: echoed completions start at the prompt's first token, the others
    /// after the prompt.
    fn writer<'t>(&self, tok: &'t crate::io::tokenizer::Tokenizer) -> LogprobWriter<'t> {
        match self.echo {
            true => LogprobWriter::new(tok, self.api, &[]),
            false => LogprobWriter::new(tok, self.api, &self.prompt_ids),
        }
    }
}

/// A prompt's tokens with their log-probabilities (none for the first).
fn prompt_entries<'a>(
    ids: &'a [u32],
    logprobs: &'a [TokenLogprobs],
) -> impl Iterator<Item = (u32, Option<&'a TokenLogprobs>)> + 'a {
    ids.iter()
        .enumerate()
        .map(move |(i, &id)| (id, i.checked_sub(1).and_then(|j| logprobs.get(j))))
}

async fn collect(mut events: UnboundedReceiver<StreamEvent>) -> Result<GenerationOutput, ApiError> {
    while let Some(e) = events.recv().await {
        match e {
            StreamEvent::Text(_) | StreamEvent::Logprobs(_) | StreamEvent::PromptLogprobs(_) => {}
            StreamEvent::Done(out) => return Ok(out),
            StreamEvent::Refused(message) => return Err(ApiError::bad(message)),
            StreamEvent::Failed(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal("the engine dropped the request"))
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. One task per choice forwards its
/// engine events, tagged with the choice's index, into one channel that a writer task turns into SSE events;
/// when the client goes away the SSE stream is dropped, the writer's send fails and it returns, the forwarders'
/// sends fail, they drop their engine receivers, and the engine cancels every choice.
fn stream_response<B: Backend + 'static>(
    app: Arc<AppState<B>>,
    answer: Answer,
    receivers: Vec<UnboundedReceiver<StreamEvent>>,
    slot: Slot<B>,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let (merged_tx, merged) = tokio::sync::mpsc::channel(64);
    let choices = receivers.len();
    for (index, mut events) in receivers.into_iter().enumerate() {
        let merged_tx = merged_tx.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if merged_tx.send((index, e)).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(merged_tx);
    tokio::spawn(async move {
        // The request holds its place until its stream ends or its client leaves.
        let _slot = slot;
        let tok = &app.service.pipeline().tokenizer;
        let _ = write_stream(&answer, tok, choices, merged, &tx).await;
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}

/// The client has gone: stop writing.
struct Gone;

/// One choice's state while it streams.
struct Streaming<'t> {
    writer: LogprobWriter<'t>,
    /// Log-probabilities of tokens whose text has not been sent yet.
    pending: Vec<TokenLogprobs>,
}

async fn write_stream(
    a: &Answer,
    tok: &crate::io::tokenizer::Tokenizer,
    choices: usize,
    mut merged: tokio::sync::mpsc::Receiver<(usize, StreamEvent)>,
    tx: &Sender<Result<SseEvent, Infallible>>,
) -> Result<(), Gone> {
    let send = |v: Value| async move {
        tx.send(Ok(SseEvent::default().data(v.to_string())))
            .await
            .map_err(|_| Gone)
    };
    let chunk = |index: usize, text: Option<&str>, finish: Option<&str>, logprobs: Option<Value>| {
        a.api.chunk(&a.id, &a.model, index, text, finish, logprobs)
    };
    let mut state: Vec<Streaming> = (0..choices)
        .map(|_| Streaming {
            writer: a.writer(tok),
            pending: Vec::new(),
        })
        .collect();
    for index in 0..choices {
        match (a.api, a.echo && !a.logprobs) {
            (Api::Chat, _) => send(chunk(index, None, None, None)).await?,
            // An echo without log-probabilities starts with the prompt at once; with them, once they are known.
            (Api::Completions, true) => send(chunk(index, Some(&a.prompt_text), None, None)).await?,
            (Api::Completions, false) => {}
        }
    }
    let mut outputs: HashMap<usize, GenerationOutput> = HashMap::new();
    while let Some((index, e)) = merged.recv().await {
        let s = &mut state[index];
        let pending_logprobs = |s: &mut Streaming| -> Result<Option<Value>, Gone> {
            if !a.logprobs {
                return Ok(None);
            }
            let tokens: Vec<_> = s.pending.iter().map(|l| (l.token, Some(l))).collect();
            let value = s.writer.write(&tokens).map_err(|_| Gone)?;
            s.pending.clear();
            Ok(Some(value))
        };
        match e {
            StreamEvent::Logprobs(lp) => s.pending.push(lp),
            StreamEvent::PromptLogprobs(lps) => {
                if a.echo {
                    let tokens: Vec<_> = prompt_entries(&a.prompt_ids, &lps).collect();
                    let value = s.writer.write(&tokens).map_err(|_| Gone)?;
                    send(chunk(index, Some(&a.prompt_text), None, Some(value))).await?;
                }
            }
            StreamEvent::Text(t) => {
                let logprobs = pending_logprobs(s)?;
                send(chunk(index, Some(&t), None, logprobs)).await?;
            }
            StreamEvent::Done(out) => {
                let logprobs = match s.pending.is_empty() {
                    true => None,
                    false => pending_logprobs(s)?,
                };
                let finish = out.finish_reason.as_str();
                send(chunk(index, None, Some(finish), logprobs)).await?;
                outputs.insert(index, out);
                if outputs.len() == choices {
                    if a.include_usage {
                        let all: Vec<GenerationOutput> =
                            (0..choices).filter_map(|i| outputs.remove(&i)).collect();
                        send(a.api.usage_chunk(&a.id, &a.model, usage(&all))).await?;
                    }
                    tx.send(Ok(SseEvent::default().data("[DONE]")))
                        .await
                        .map_err(|_| Gone)?;
                    return Ok(());
                }
            }
            StreamEvent::Refused(message) => {
                return send(ApiError::bad(message).body()).await;
            }
            StreamEvent::Failed(message) => {
                return send(ApiError::internal(message).body()).await;
            }
        }
    }
    Ok(())
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
