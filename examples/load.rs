//! Load generator for `flamingo serve`: N concurrent clients send streaming chat completions (with an image) for a
//! bounded time, then it reports requests/s, generated tokens/s, end-to-end and time-to-first-token percentiles,
//! and errors. Run through `scripts/load.sh`, or:
//! `cargo run --release --example load -- --url http://127.0.0.1:8000 --concurrency 16 --seconds 20`

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Image sent with every request (PNG).
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// One finished request.
struct Sample {
    latency: f64,
    first_token: Option<f64>,
    tokens: u64,
}

fn main() {
    let args = Args::parse();
    let body = request_body(&args);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    let results: Vec<(Vec<Sample>, Vec<String>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..args.concurrency)
            .map(|_| s.spawn(|| client(&args.url, &body, deadline)))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut samples: Vec<Sample> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for (s, e) in results {
        samples.extend(s);
        errors.extend(e);
    }
    report(&args, elapsed, &samples, &errors);
}

fn request_body(args: &Args) -> String {
    let mut content = vec![json!({"type": "text", "text": "Describe this image."})];
    if let Some(path) = &args.image {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        );
        content.insert(0, json!({"type": "image_url", "image_url": {"url": url}}));
    }
    json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": args.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

/// Sends requests back to back until the deadline.
fn client(base: &str, body: &str, deadline: Instant) -> (Vec<Sample>, Vec<String>) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(300))
        .build();
    let url = format!("{base}/v1/chat/completions");
    let (mut samples, mut errors) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        match one_request(&agent, &url, body) {
            Ok(s) => samples.push(s),
            Err(e) => errors.push(e),
        }
    }
    (samples, errors)
}

fn one_request(agent: &ureq::Agent, url: &str, body: &str) -> Result<Sample, String> {
    let start = Instant::now();
    let response = agent
        .post(url)
        .send_string(body)
        .map_err(|e| e.to_string())?;
    let (mut first_token, mut tokens, mut done) = (None, 0, false);
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if let Some(err) = v.get("error") {
            return Err(err.to_string());
        }
        if first_token.is_none() && v["choices"][0]["delta"]["content"].is_string() {
            first_token = Some(start.elapsed().as_secs_f64());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    if !done {
        return Err("stream ended without [DONE]".into());
    }
    Ok(Sample {
        latency: start.elapsed().as_secs_f64(),
        first_token,
        tokens,
    })
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() - 1) as f64 * p).round() as usize]
}

fn report(args: &Args, elapsed: f64, samples: &[Sample], errors: &[String]) {
    let mut latency: Vec<f64> = samples.iter().map(|s| s.latency).collect();
    let mut ttft: Vec<f64> = samples.iter().filter_map(|s| s.first_token).collect();
    let tokens: u64 = samples.iter().map(|s| s.tokens).sum();
    let summary = json!({
        "concurrency": args.concurrency,
        "seconds": elapsed,
        "requests": samples.len(),
        "errors": errors.len(),
        "requests_per_s": samples.len() as f64 / elapsed,
        "generated_tokens_per_s": tokens as f64 / elapsed,
        "latency_p50_s": percentile(&mut latency, 0.5),
        "latency_p99_s": percentile(&mut latency, 0.99),
        "ttft_p50_s": percentile(&mut ttft, 0.5),
        "ttft_p99_s": percentile(&mut ttft, 0.99),
        "first_error": errors.first(),
    });
    if args.json {
        println!("{summary}");
        return;
    }
    println!("| metric | value |\n|---|---|");
    for (k, v) in summary.as_object().unwrap() {
        println!("| {k} | {v} |");
    }
}
