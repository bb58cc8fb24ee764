//! What the server's handlers share: the engine service, the model's name and chat template, the image policy and
//! limits, and the in-flight count that turns requests past `max_in_flight` away with 429.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;

use crate::backend::Backend;
use crate::runtime::service::EngineService;
use crate::server::images::ImagePolicy;
use crate::server::openai::{ApiError, ChatTemplate};

/// What the server is allowed to accept.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Requests in flight (preparing, queued, running or streaming) beyond which new ones get 429.
    pub max_in_flight: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    pub max_body_bytes: usize,
}

/// Who may call the API and from where.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Requests to `/v1/*`, `/tokenize` and `/detokenize` must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Origins browsers may call from (`*`: any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
}

/// Everything the handlers share.
pub struct AppState<B: Backend + 'static> {
    pub service: EngineService<B>,
    pub model_name: String,
    /// The chat format `--chat-template` gave; `None`: the model's own Jinja template (or IDEFICS' format where
    /// the model ships none).
    pub template: Option<ChatTemplate>,
    pub images: ImagePolicy,
    pub limits: ServerLimits,
    pub access: Access,
    /// Random per start, so that response ids never repeat across restarts.
    pub(super) id_prefix: String,
    pub(super) next_id: AtomicU64,
    /// Responses sent, by status code.
    pub(super) responses: Mutex<BTreeMap<u16, u64>>,
    pub(super) rejected: AtomicU64,
    /// Requests admitted by the server and not yet answered (preparing, queued, running or streaming).
    pub(super) admitted: AtomicUsize,
}

/// A request's place under `max_in_flight`, taken atomically at arrival and given back when it is answered.
pub(super) struct Slot<B: Backend + 'static>(Arc<AppState<B>>);

impl<B: Backend + 'static> Slot<B> {
    pub(super) fn take(app: &Arc<AppState<B>>) -> Result<Self, ApiError> {
        let before = app.admitted.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(app.clone());
        if before >= app.limits.max_in_flight {
            app.rejected.fetch_add(1, Ordering::SeqCst);
            return Err(ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("the server is at capacity ({before} requests in flight); retry later"),
                )
            });
        }
        Ok(slot)
    }
}

impl<B: Backend + 'static> Drop for Slot<B> {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<B: Backend + 'static> AppState<B> {
    pub fn new(
        service: EngineService<B>,
        model_name: String,
        template: Option<ChatTemplate>,
        images: ImagePolicy,
        limits: ServerLimits,
        access: Access,
    ) -> Self {
        let start = crate::model::sampling::fresh_seed();
        AppState {
            service,
            model_name,
            template,
            images,
            limits,
            access,
            id_prefix: format!("{start:016x}"),
            next_id: AtomicU64::new(0),
            responses: Mutex::new(BTreeMap::new()),
            rejected: AtomicU64::new(0),
            admitted: AtomicUsize::new(0),
        }
    }
}

impl<B: Backend + 'static> AppState<B> {
    /// A response id never given before, by this start or another: `chatcmpl-…` or `cmpl-…`.
    pub(super) fn response_id(&self, kind: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        format!("{kind}-{}{n:x}", self.id_prefix)
    }
}
