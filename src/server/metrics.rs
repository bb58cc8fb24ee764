//! `GET /metrics` in Prometheus' text exposition format: request, response and token counters, queue depth, KV-cache
//! blocks, and histograms of step latency, time to first token, end-to-end latency, queue time and tokens per
//! request.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::backend::Backend;
use crate::runtime::service::Histogram;
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
        "kv_blocks_cached",
        "gauge",
        "KV-cache blocks holding cached prompt content (in use or idle).",
        &[("", stats.kv_blocks_cached as f64)],
    );
    let cache = &stats.cache;
    for (name, help, value) in [
        ("prefix_cache_queries_total", "Prompt rows admitted requests had to compute before the prefix cache.", cache.admitted_rows),
        ("prefix_cache_hits_total", "Prompt rows found in the prefix cache (not computed).", cache.prefix_hit_rows),
        ("prefill_rows_saved_total", "Prompt rows not computed: prefix-cache hits and rows shared by forks.", stats.prefill_rows_saved()),
        ("kv_block_evictions_total", "Idle cached KV blocks dropped to make room.", cache.block_evictions),
        ("media_cache_queries_total", "Images of admitted requests.", cache.admitted_images),
        ("media_cache_evictions_total", "Idle cached images whose slot was taken for another.", cache.media_evictions),
        ("media_cache_hits_total", "Images whose K/V the media cache held already (not encoded again).", cache.media_hits),
        ("images_encoded_total", "Images run through the vision tower.", stats.images_encoded),
    ] {
        metric(name, "counter", help, &[("", value as f64)]);
    }
    metric(
        "recorded_steps_total",
        "counter",
        "Decode steps run from a recording (CUDA graph replays).",
        &[("", stats.recorded_steps as f64)],
    );
    let statuses: Vec<(String, f64)> = app
        .responses
        .lock()
        .expect("metrics lock")
        .iter()
        .map(|(code, n)| (format!("{{status=\"{code}\"}}"), *n as f64))
        .collect();
    let statuses: Vec<(&str, f64)> = statuses.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "http_responses_total",
        "counter",
        "HTTP responses by status code (4xx and 5xx included).",
        &statuses,
    );
    let h = m.histograms.lock().expect("metrics lock").clone();
    for (name, help, hist) in [
        ("step_seconds", "Engine step latency.", &h.step_seconds),
        ("time_to_first_token_seconds", "Submission to the first new token.", &h.time_to_first_token_seconds),
        ("e2e_request_latency_seconds", "Submission to completion.", &h.e2e_request_latency_seconds),
        ("queue_time_seconds", "Submission to the request's first step.", &h.queue_time_seconds),
        ("request_prompt_tokens", "Prompt tokens per finished request.", &h.request_prompt_tokens),
        ("request_generation_tokens", "Generated tokens per finished request.", &h.request_generation_tokens),
    ] {
        histogram(&mut out, name, help, hist);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(
        out,
        "# HELP flamingo_{name} {help}\n# TYPE flamingo_{name} histogram"
    );
    let mut cumulative = 0;
    for (i, c) in h.counts.iter().enumerate() {
        cumulative += c;
        let le = h.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
        let _ = writeln!(out, "flamingo_{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(
        out,
        "flamingo_{name}_sum {}\nflamingo_{name}_count {cumulative}",
        h.sum
    );
}
