//! `GET /metrics` in Prometheus' text exposition format: request and token counters, queue depth, KV-cache blocks,
//! and a histogram of engine step latency.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::backend::Backend;
use crate::runtime::service::STEP_BUCKETS;
use crate::server::state::AppState;

pub async fn render<B: Backend + 'static>(
    State(app): State<Arc<AppState<B>>>,
) -> impl IntoResponse {
    let m = app.service.metrics();
    let stats = *m.stats.lock().expect("metrics lock");
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(
            out,
            "# HELP flamingo_{name} {help}\n# TYPE flamingo_{name} {kind}"
        );
        for (labels, value) in samples {
            let _ = writeln!(out, "flamingo_{name}{labels} {value}");
        }
    };
    let count = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::SeqCst) as f64;
    metric(
        "requests_total",
        "counter",
        "Requests by outcome.",
        &[
            ("{outcome=\"finished\"}", count(&m.requests_finished)),
            ("{outcome=\"failed\"}", count(&m.requests_failed)),
            ("{outcome=\"cancelled\"}", count(&m.requests_cancelled)),
            (
                "{outcome=\"rejected\"}",
                app.rejected.load(Ordering::SeqCst) as f64,
            ),
        ],
    );
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens of finished requests.",
        &[("", count(&m.prompt_tokens))],
    );
    metric(
        "generation_tokens_total",
        "counter",
        "Tokens generated.",
        &[("", count(&m.generated_tokens))],
    );
    metric(
        "requests_in_flight",
        "gauge",
        "Requests accepted and not finished.",
        &[("", m.in_flight.load(Ordering::SeqCst) as f64)],
    );
    metric(
        "queue_depth",
        "gauge",
        "Requests waiting for a batch slot.",
        &[("", stats.waiting as f64)],
    );
    metric(
        "running_requests",
        "gauge",
        "Requests in the running batch.",
        &[("", stats.running as f64)],
    );
    metric(
        "kv_blocks_used",
        "gauge",
        "KV-cache blocks in use.",
        &[("", stats.kv_blocks_used as f64)],
    );
    metric(
        "kv_blocks_total",
        "gauge",
        "KV-cache blocks in the pool.",
        &[("", stats.kv_blocks_total as f64)],
    );
    metric(
        "preemptions_total",
        "counter",
        "Sequences preempted to free KV blocks.",
        &[("", stats.preemptions as f64)],
    );
    metric(
        "recorded_steps_total",
        "counter",
        "Decode steps run from a recording (CUDA graph replays).",
        &[("", stats.recorded_steps as f64)],
    );
    let (counts, sum) = *m.step_counts.lock().expect("metrics lock");
    let _ = writeln!(
        out,
        "# HELP flamingo_step_seconds Engine step latency.\n# TYPE flamingo_step_seconds histogram"
    );
    let mut cumulative = 0;
    for (i, c) in counts.iter().enumerate() {
        cumulative += c;
        let le = STEP_BUCKETS
            .get(i)
            .map_or("+Inf".to_string(), |b| b.to_string());
        let _ = writeln!(
            out,
            "flamingo_step_seconds_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "flamingo_step_seconds_sum {sum}\nflamingo_step_seconds_count {cumulative}"
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
