//! Serving connections so that no client can hold the server: a cap on open connections (one past it is closed at
//! once, before it costs a file descriptor for long), a timeout for each request's headers (which also closes idle
//! keep-alive connections), a timeout and a size check for each body (413 from `Content-Length` before reading),
//! and a graceful shutdown that finishes the requests in flight but waits no longer than a grace period.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

use crate::server::openai::ApiError;

/// How long clients may take, and how many may be connected.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// For a request's headers, and for the next request on an idle keep-alive connection.
    pub header_timeout: Duration,
    /// For a request's body.
    pub body_timeout: Duration,
    pub max_body_bytes: usize,
    /// How long shutdown waits for the requests in flight.
    pub shutdown_grace: Duration,
}

/// Open connections at most by default: what the process's file-descriptor limit leaves room for, with 64 kept
/// for model files and the engine.
pub fn default_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let line = text
                .lines()
                .find(|l| l.starts_with("Max open files"))?
                .to_string();
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        })
        .unwrap_or(1024);
    soft.saturating_sub(64).clamp(16, 4096)
}

/// Serves `app` on `listener` until `shutdown` resolves, then finishes the requests in flight within the grace.
pub async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app.layer(axum::middleware::from_fn(move |req, next| {
        read_body(req, next, limits)
    }));
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // Out of file descriptors (or a connection reset before accept): wait a moment instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            eprintln!(
                "flamingo: requests still open after the {} s shutdown grace are dropped",
                limits.shutdown_grace.as_secs()
            );
        }
    }
    Ok(())
}

/// Reads a request's whole body before the handler runs: 413 when `Content-Length` (or what arrives) is over the
/// limit, 408 when it does not arrive within the body timeout.
async fn read_body(req: Request, next: Next, limits: ConnectionLimits) -> Response {
    let max = limits.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return too_large(max).into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes =
        match tokio::time::timeout(limits.body_timeout, axum::body::to_bytes(body, max)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(_)) => return too_large(max).into_response(),
            Err(_) => {
                return ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} s",
                        limits.body_timeout.as_secs()
                    ),
                )
                .into_response()
            }
        };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is over the limit of {max} bytes (--max-body-bytes)"),
    )
}
