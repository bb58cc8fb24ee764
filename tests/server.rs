//! `flamingo serve` over real HTTP on loopback, CPU backend, fixture model: answers equal `flamingo generate`,
//! streaming equals non-streaming, 32 concurrent clients, every bad input gets its 4xx, 429 at capacity, a client
//! that disconnects is cancelled, SIGTERM finishes in-flight requests.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{fixture_dir, Fixture};
use serde_json::{json, Value};

struct Server {
    child: Child,
    base: String,
}

impl Server {
    /// Starts the server on a free port with extra flags and waits until it listens.
    fn start(flags: &[&str]) -> Server {
        Server::start_model("tiny-idefics-a", flags)
    }

    /// Starts the server on fixture model `name`.
    fn start_model(name: &str, flags: &[&str]) -> Server {
        let fx = fixture_dir(name);
        let mut child = Command::new(env!("CARGO_BIN_EXE_flamingo"))
            .args(["serve", "--port", "0", "--model"])
            .arg(&fx)
            .args(flags)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(addr) = line.strip_prefix("flamingo: listening on ") {
                break addr.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, base }
    }

    fn post(&self, path: &str, body: &str) -> (u16, String) {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        match agent
            .post(&format!("{}{path}", self.base))
            .set("Content-Type", "application/json")
            .send_string(body)
        {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    /// The status and the `Retry-After` header of a POST.
    fn post_retry_after(&self, path: &str, body: &str) -> (u16, Option<String>) {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        let r = match agent.post(&format!("{}{path}", self.base)).send_string(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{path}: {e}"),
        };
        (r.status(), r.header("retry-after").map(str::to_string))
    }

    /// Status and body of any method on `path`.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let req = ureq::request(method, &format!("{}{path}", self.base));
        let r = match body.map_or_else(|| req.clone().call(), |b| req.clone().send_string(b)) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = r.status();
        let text = r.into_string().unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}")))
    }

    fn post_json(&self, path: &str, body: &Value) -> Value {
        let (status, text) = self.post(path, &body.to_string());
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    fn get(&self, path: &str) -> String {
        ureq::get(&format!("{}{path}", self.base))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    /// The `data:` payloads of a streamed response, in order.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = ureq::post(&format!("{}{path}", self.base))
            .send_string(&body.to_string())
            .unwrap();
        BufReader::new(r.into_reader())
            .lines()
            .map(Result::unwrap)
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn data_url(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A 35-byte GIF whose one frame claims 17 GB (its screen is 1x1), as a `data:` URL.
fn gif_frame_bomb() -> String {
    let mut g = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff".to_vec();
    g.extend(b"\x2c\x00\x00\x00\x00\xff\xff\xff\xff\x00\x02\x02\x4c\x01\x00\x3b");
    format!(
        "data:image/gif;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(g)
    )
}

/// A one-turn chat with the fixture image.
fn chat_body(max_tokens: usize, stream: bool) -> Value {
    let image = fixture_dir("tiny-idefics-a").join("chelsea.png");
    json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(&image)}},
            {"type": "text", "text": "Describe this image."}
        ]}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// About 170 tokens of the fixture's tokenizer: with `--max-step-tokens 1` its prefill takes that many steps.
fn slow_prompt() -> String {
    "word ".repeat(30)
}

/// The prompt the default chat template builds for `chat_body`.
const CHAT_PROMPT: &str = "User:<image>Describe this image.<end_of_utterance>\nAssistant:";

#[test]
fn chat_answers_what_generate_answers_and_streams_the_same_text() {
    let server = Server::start(&[]);
    let fx = Fixture::load("tiny-idefics-a");
    let out = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["generate", "--json", "--max-new-tokens", "12", "--model"])
        .arg(&fx.dir)
        .args(["--prompt", CHAT_PROMPT, "--image"])
        .arg(fx.dir.join("chelsea.png"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Value = serde_json::from_slice(&out.stdout).unwrap();

    let got = server.post_json("/v1/chat/completions", &chat_body(12, false));
    let choice = &got["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], want["text"]);
    assert_eq!(choice["finish_reason"], want["finish_reason"]);
    assert_eq!(got["object"], "chat.completion");
    let usage = &got["usage"];
    assert_eq!(
        usage["prompt_tokens"],
        want["prompt_ids"].as_array().unwrap().len()
    );
    assert_eq!(
        usage["completion_tokens"],
        want["generated_ids"].as_array().unwrap().len()
    );

    let chunks = server.stream("/v1/chat/completions", &chat_body(12, true));
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    let parsed: Vec<Value> = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = parsed
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want["text"].as_str().unwrap(), "streamed text");
    assert!(
        parsed.len() > 3,
        "the text arrived in one piece: {parsed:?}"
    );
    assert_eq!(
        parsed.last().unwrap()["choices"][0]["finish_reason"],
        want["finish_reason"]
    );
}

#[test]
fn completions_take_raw_prompts_with_image_markers() {
    let server = Server::start(&[]);
    let image = fixture_dir("tiny-idefics-a").join("chelsea.png");
    let body = json!({"prompt": CHAT_PROMPT, "images": [data_url(&image)], "max_tokens": 12});
    let got = server.post_json("/v1/completions", &body);
    let chat = server.post_json("/v1/chat/completions", &chat_body(12, false));
    assert_eq!(got["object"], "text_completion");
    assert_eq!(
        got["choices"][0]["text"],
        chat["choices"][0]["message"]["content"]
    );
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = server.stream("/v1/completions", &streamed);
    let text: String = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| {
            serde_json::from_str::<Value>(c).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, got["choices"][0]["text"].as_str().unwrap());
    let models: Value = serde_json::from_str(&server.get("/v1/models")).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-idefics-a");
    assert_eq!(server.get("/health"), r#"{"status":"ok"}"#);
}

/// OpenFlamingo's few-shot evaluation prompt with its two images as data URLs: the completion is OpenFlamingo's
/// greedy text, streamed or not, chat is refused with a 400 saying where its prompts go (it has no chat format), and
/// `/tokenize` counts the prompt as its tokenizer does (no BOS).
#[test]
fn openflamingo_completions_give_openflamingos_greedy_text() {
    let server = Server::start_model("tiny-openflamingo-b", &[]);
    let fx = Fixture::load("tiny-openflamingo-b");
    let meta: Value = serde_json::from_slice(&std::fs::read(fx.dir.join("golden.json")).unwrap()).unwrap();
    let images: Vec<String> = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| data_url(&fx.dir.join(i["file_in_fixture"].as_str().unwrap())))
        .collect();
    let body = json!({"prompt": meta["prompt"], "images": images, "max_tokens": 10, "temperature": 0});
    let got = server.post_json("/v1/completions", &body);
    assert_eq!(got["choices"][0]["text"], meta["generated_text"], "{got}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = server.stream("/v1/completions", &streamed);
    let text: String = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str::<Value>(c).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, meta["generated_text"].as_str().unwrap());
    // No chat format to guess: the client is told where OpenFlamingo's prompts go.
    let (status, text) = server.post("/v1/chat/completions", &chat_body(4, false).to_string());
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("no chat format") && text.contains("/v1/completions"), "{text}");
    let tokens = server.post_json("/tokenize", &json!({"prompt": meta["prompt"]}));
    let want: Vec<u64> = fx.ids("input_ids").iter().map(|&i| i as u64).collect();
    assert_eq!(tokens["tokens"], json!(want));
}

#[test]
fn thirty_two_concurrent_clients_all_get_complete_answers() {
    let server = Server::start(&[]);
    let want = server.post_json("/v1/chat/completions", &chat_body(10, false))["choices"][0]
        ["message"]["content"]
        .clone();
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let server = &server;
                s.spawn(move || {
                    if i % 2 == 0 {
                        let chunks = server.stream("/v1/chat/completions", &chat_body(10, true));
                        assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
                        chunks[..chunks.len() - 1]
                            .iter()
                            .filter_map(|c| {
                                let v: Value = serde_json::from_str(c).unwrap();
                                v["choices"][0]["delta"]["content"]
                                    .as_str()
                                    .map(str::to_string)
                            })
                            .collect()
                    } else {
                        let v = server.post_json("/v1/chat/completions", &chat_body(10, false));
                        v["choices"][0]["message"]["content"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a, want.as_str().unwrap(), "client {i}");
    }
    assert_eq!(
        server.metric("flamingo_requests_total{outcome=\"finished\"}"),
        33.0
    );
    assert_eq!(server.metric("flamingo_requests_in_flight"), 0.0);
    assert!(server.metric("flamingo_generation_tokens_total") > 0.0);
    assert!(server.metric("flamingo_step_seconds_count") > 0.0);
    // The same chat 33 times: the prompt's full blocks are computed once while they stay cached.
    let hits = server.metric("flamingo_prefix_cache_hits_total");
    assert!(hits > 0.0 && hits < server.metric("flamingo_prefix_cache_queries_total"), "{hits}");
    assert!(server.metric("flamingo_prefill_rows_saved_total") >= hits);
}

#[test]
fn every_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--max-images",
        "2",
        "--max-image-bytes",
        "4000",
        "--max-tokens",
        "20",
        "--allow-local-images",
        dir.path().to_str().unwrap(),
    ]);
    let image_part = |url: &str| json!({"type": "image_url", "image_url": {"url": url}});
    let user = |content: Value| json!({"messages": [{"role": "user", "content": content}], "max_tokens": 4});
    let png = fixture_dir("images").join("chelsea.png");
    let big = "data:image/png;base64,".to_string() + &"A".repeat(8000);
    let garbage = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b"this is not an image at all")
    );
    let long_prompt = "word ".repeat(400);
    let fifo = dir.path().join("pipe.png");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let gif_frame_bomb = gif_frame_bomb();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "{\"messages\": [".into(),
            400,
            "invalid request body",
        ),
        (
            "wrong type",
            json!({"messages": "hi"}).to_string(),
            400,
            "invalid request body",
        ),
        (
            "max_tokens type",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"})
                .to_string(),
            400,
            "invalid request body",
        ),
        (
            "empty messages",
            json!({"messages": []}).to_string(),
            400,
            "messages: must not be empty",
        ),
        (
            "unknown role",
            json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(),
            400,
            "unknown role",
        ),
        (
            "bad base64",
            user(json!([image_part("data:image/png;base64,@@@@")])).to_string(),
            400,
            "invalid base64",
        ),
        (
            "undecodable image",
            user(json!([image_part(&garbage)])).to_string(),
            400,
            "image 0",
        ),
        (
            "a FIFO inside the allowed folder",
            user(json!([image_part("pipe.png")])).to_string(),
            400,
            "not a regular file",
        ),
        (
            "GIF frame larger than its 1x1 screen (35 bytes claiming 17 GB)",
            user(json!([image_part(&gif_frame_bomb)])).to_string(),
            400,
            "more memory",
        ),
        (
            "oversized image",
            user(json!([image_part(&big)])).to_string(),
            400,
            "over the limit",
        ),
        (
            "too many images",
            user(json!([
                image_part(&garbage),
                image_part(&garbage),
                image_part(&garbage)
            ]))
            .to_string(),
            400,
            "3 images",
        ),
        (
            "prompt over the context",
            user(json!(long_prompt)).to_string(),
            400,
            "context",
        ),
        (
            "max_tokens over the limit",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 21}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "remote image",
            user(json!([image_part("http://example.com/cat.png")])).to_string(),
            400,
            "remote image URLs are disabled",
        ),
        (
            "file outside the folder",
            user(json!([image_part(png.to_str().unwrap())])).to_string(),
            400,
            "not a readable file inside",
        ),
        (
            "bad temperature",
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": -2}).to_string(),
            400,
            "temperature",
        ),
        (
            "n > 16",
            json!({"messages": [{"role": "user", "content": "x"}], "n": 17}).to_string(),
            400,
            "n:",
        ),
        (
            "a field not honoured",
            json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})
                .to_string(),
            400,
            "response_format: not supported",
        ),
        (
            "logit_bias on a token outside the vocabulary",
            json!({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 1}}).to_string(),
            400,
            "logit_bias",
        ),
        (
            "top_logprobs over 20",
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21})
                .to_string(),
            400,
            "top_logprobs",
        ),
    ];
    for (what, body, status, needle) in &cases {
        let (got, text) = server.post("/v1/chat/completions", body);
        assert_eq!(got, *status, "{what}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {text}"));
        assert!(
            msg.contains(needle),
            "{what}: expected {needle:?} in {msg:?}"
        );
        assert_eq!(v["error"]["type"], "invalid_request_error", "{what}");
    }
    // A small file inside the allowed folder is fine.
    image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 16, y as u8 * 16, 128]))
        .save(dir.path().join("cat.png"))
        .unwrap();
    let ok = server.post_json(
        "/v1/chat/completions",
        &user(json!([image_part("cat.png")])),
    );
    assert!(ok["choices"][0]["message"]["content"].is_string());
    assert_eq!(server.get("/health"), r#"{"status":"ok"}"#);
}

#[test]
fn requests_beyond_capacity_get_429() {
    // One sequence at a time, no queue, and slow prefills (one token per step): concurrent requests overlap.
    let server = Server::start(&[
        "--max-concurrent",
        "1",
        "--max-queue",
        "0",
        "--max-step-tokens",
        "1",
    ]);
    let body = json!({"messages": [{"role": "user", "content": slow_prompt()}], "max_tokens": 40});
    // All clients fire together: the first admitted holds the only slot for ~200 engine steps while the others
    // arrive within the same few milliseconds.
    let clients = 32;
    let start = std::sync::Barrier::new(clients);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    let (status, retry) =
                        server.post_retry_after("/v1/chat/completions", &body.to_string());
                    if status == 429 {
                        assert_eq!(retry.as_deref(), Some("1"), "a 429 says when to retry");
                    }
                    status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(server.metric("flamingo_requests_total{outcome=\"rejected\"}") >= 1.0);
    let rejected = statuses.iter().filter(|&&s| s == 429).count() as f64;
    assert_eq!(server.metric("flamingo_http_responses_total{status=\"429\"}"), rejected);
}

/// What operating the server needs: OpenAI-shaped 404 and 405, the served model by id (any other is a 404, also as
/// a request's `model`), vLLM's tokenize and detokenize, metrics that count 4xx responses and time requests, and
/// response ids that differ across restarts.
#[test]
fn operations_endpoints_answer_in_openai_shapes_and_metrics_count_them() {
    let server = Server::start(&[]);
    let (status, v) = server.call("GET", "/v1/nothing", None);
    assert_eq!(status, 404);
    assert!(v["error"]["message"].as_str().unwrap().contains("/v1/nothing"), "{v}");
    let (status, v) = server.call("DELETE", "/v1/models", None);
    assert_eq!(status, 405);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (status, v) = server.call("GET", "/v1/models/tiny-idefics-a", None);
    assert_eq!((status, v["id"].as_str()), (200, Some("tiny-idefics-a")));
    let (status, v) = server.call("GET", "/v1/models/llama", None);
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("model_not_found")));
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "x"}]}).to_string();
    assert_eq!(server.call("POST", "/v1/chat/completions", Some(&body)).0, 404);
    let prompt = "User:<image>Describe this image.\nAssistant:";
    let (status, t) = server.call("POST", "/tokenize", Some(&json!({"prompt": prompt}).to_string()));
    assert_eq!(status, 200, "{t}");
    let tokens = t["tokens"].as_array().unwrap();
    assert_eq!(t["count"].as_u64().unwrap() as usize, tokens.len());
    assert_eq!(t["token_strs"].as_array().unwrap().len(), tokens.len());
    let (status, d) = server.call("POST", "/detokenize", Some(&json!({"tokens": tokens}).to_string()));
    assert_eq!(status, 200);
    assert!(d["prompt"].as_str().unwrap().contains("Describe this image."), "{d}");
    let (status, e) = server.call("POST", "/detokenize", Some(&json!({"tokens": [1, 99999999]}).to_string()));
    assert_eq!(status, 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("tokens[1]"), "{e}");
    let chat = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3});
    let first = server.post_json("/v1/chat/completions", &chat)["id"].as_str().unwrap().to_string();
    let second = server.post_json("/v1/chat/completions", &chat)["id"].as_str().unwrap().to_string();
    assert_ne!(first, second);
    assert!(server.metric("flamingo_http_responses_total{status=\"404\"}") >= 3.0);
    assert_eq!(server.metric("flamingo_http_responses_total{status=\"405\"}"), 1.0);
    assert!(server.metric("flamingo_http_responses_total{status=\"400\"}") >= 1.0);
    for histogram in [
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "queue_time_seconds",
        "request_generation_tokens",
    ] {
        assert_eq!(server.metric(&format!("flamingo_{histogram}_count")), 2.0, "{histogram}");
    }
    assert_eq!(server.metric("flamingo_request_generation_tokens_sum"), 6.0);
    drop(server);
    let restarted = Server::start(&[]);
    let again = restarted.post_json("/v1/chat/completions", &chat)["id"].as_str().unwrap().to_string();
    assert_ne!(again, first, "ids do not restart with the server");
}

#[test]
fn a_client_that_disconnects_is_cancelled() {
    let server = Server::start(&["--max-step-tokens", "1"]);
    let body = json!({"messages": [{"role": "user", "content": slow_prompt()}], "max_tokens": 50,
                      "stream": true});
    {
        let r = ureq::post(&format!("{}/v1/chat/completions", server.base))
            .send_string(&body.to_string())
            .unwrap();
        let mut first = [0u8; 16];
        r.into_reader().read_exact(&mut first).unwrap();
    } // connection dropped here, long before the prompt is even prefilled
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric("flamingo_requests_in_flight") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned request is still in flight"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        server.metric("flamingo_requests_total{outcome=\"cancelled\"}"),
        1.0
    );
    assert_eq!(server.metric("flamingo_kv_blocks_used"), 0.0);
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits() {
    let mut server = Server::start(&["--max-step-tokens", "1"]);
    let body = json!({"messages": [{"role": "user", "content": slow_prompt()}], "max_tokens": 5});
    std::thread::scope(|s| {
        let request = s.spawn(|| server.post("/v1/chat/completions", &body.to_string()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.metric("flamingo_requests_in_flight") == 0.0 {
            assert!(Instant::now() < deadline, "the request never got in flight");
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = server.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let (status, text) = request.join().unwrap();
        assert_eq!(status, 200, "{text}");
    });
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "exit {exit:?}");
}

/// A loopback HTTP server that answers every connection with `respond` (given the stream), one thread each.
fn hostile_http(respond: fn(std::net::TcpStream)) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || respond(stream));
        }
    });
    format!("http://{addr}")
}

#[test]
fn remote_images_that_stall_trickle_or_redirect_off_http_fail_alone_and_in_time() {
    use std::io::Write;
    let silent = hostile_http(|s| {
        std::thread::sleep(Duration::from_secs(30));
        drop(s);
    });
    let trickle = hostile_http(|mut s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
        for _ in 0..30 {
            std::thread::sleep(Duration::from_millis(500));
            if s.write_all(b"x").is_err() {
                return;
            }
        }
    });
    let to_file = hostile_http(|mut s| {
        let _ = s.write_all(
            b"HTTP/1.1 302 Found\r\nLocation: file:///etc/passwd\r\nContent-Length: 0\r\n\r\n",
        );
    });
    let server = Server::start(&["--allow-remote-images", "--image-fetch-timeout-secs", "2"]);
    let ask = |url: String| {
        let part = json!({"type": "image_url", "image_url": {"url": url}});
        let body = json!({"messages": [{"role": "user", "content": [part]}], "max_tokens": 2});
        let start = Instant::now();
        let (status, text) = server.post("/v1/chat/completions", &body.to_string());
        (status, text, start.elapsed())
    };
    for (url, expected) in [
        (format!("{silent}/cat.png"), "took longer than 2 s"),
        (format!("{trickle}/cat.png"), "took longer than 2 s"),
        (format!("{to_file}/cat.png"), "not an http(s) URL"),
    ] {
        let (status, text, took) = ask(url.clone());
        assert_eq!(status, 400, "{url}: {text}");
        assert!(text.contains(expected), "{url}: {text}");
        assert!(
            took < Duration::from_secs(10),
            "{url}: answered after {took:?}"
        );
    }
    let ok = server.post_json("/v1/chat/completions", &chat_body(2, false));
    assert!(ok["choices"][0]["message"]["content"].is_string());
}

/// Opens a raw connection to the server and sends `bytes`.
fn raw_connection(server: &Server, bytes: &[u8]) -> std::net::TcpStream {
    let addr = server.base.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    s
}

/// Whether the server closes `s` within `limit` (reads reach end of stream or fail).
fn closed_within(mut s: std::net::TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return start.elapsed() < limit,
        }
    }
}

#[test]
fn slow_idle_and_oversized_clients_cannot_hold_the_server() {
    let server = Server::start(&[
        "--header-timeout-secs",
        "1",
        "--body-timeout-secs",
        "1",
        "--max-connections",
        "4",
        "--shutdown-grace-secs",
        "2",
    ]);
    // A Content-Length of 1 TB is answered 413 at once, without waiting for the body.
    let mut huge = raw_connection(
        &server,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n",
    );
    huge.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = [0u8; 64];
    let n = huge.read(&mut answer).unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 413"),
        "{:?}",
        &answer[..n]
    );
    // Headers that never finish, and a body that never comes, are cut off.
    let partial_head = raw_connection(
        &server,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
    );
    assert!(
        closed_within(partial_head, Duration::from_secs(5)),
        "partial headers held the connection"
    );
    let partial_body = raw_connection(
        &server,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
    );
    let mut partial_body = partial_body;
    partial_body
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = partial_body.read(&mut answer).unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 408"),
        "{:?}",
        &answer[..n]
    );
    // More idle connections than the cap: the extra ones are closed, the idle ones time out, and a good request
    // gets through afterwards.
    let idle: Vec<_> = (0..8).map(|_| raw_connection(&server, b"")).collect();
    std::thread::sleep(Duration::from_millis(2500));
    let ok = server.post_json("/v1/chat/completions", &chat_body(2, false));
    assert!(ok["choices"][0]["message"]["content"].is_string());
    // SIGTERM completes within the grace although a client holds a partial request.
    let _holder = raw_connection(&server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n");
    drop(idle);
    let mut server = server;
    let term = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    while server.child.try_wait().unwrap().is_none() {
        assert!(
            term.elapsed() < Duration::from_secs(10),
            "shutdown did not finish in time"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Llama 3.2 Vision behind the OpenAI API: the model's own chat template builds the prompt (the answer is what
/// `generate --chat` gives), and a template that raises (images with a system message) is a 400 with its message.
#[test]
fn mllama_chat_renders_the_models_template_and_a_raising_template_is_a_400() {
    let server = Server::start_model("tiny-mllama-a", &[]);
    let fx = Fixture::load("tiny-mllama-a");
    let image = fx.image_paths()[0].clone();
    let user = json!({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(&image)}},
        {"type": "text", "text": "What is the cat doing?"}
    ]});
    let body = json!({"messages": [user.clone()], "max_tokens": 8});
    let answer = server.post_json("/v1/chat/completions", &body);
    assert_eq!(answer["usage"]["prompt_tokens"], fx.ids("input_ids").len());
    let out = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["generate", "--device", "cpu", "--json", "--chat", "--max-new-tokens", "8", "--model"])
        .arg(&fx.dir)
        .args(["--prompt", "What is the cat doing?", "--image"])
        .arg(&image)
        .output()
        .unwrap();
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], cli["text"]);

    let body = json!({"messages": [{"role": "system", "content": "Be brief."}, user], "max_tokens": 8});
    let (status, text) = server.post("/v1/chat/completions", &body.to_string());
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("Prompting with images is incompatible with system messages."), "{text}");
    // The server keeps serving.
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2});
    server.post_json("/v1/chat/completions", &body);
}

/// Good clients beside hostile ones, all at once on loopback: slow (headers trickled a byte at a time), bombing
/// (a 17 GB GIF frame, a 1 TB Content-Length) and disconnecting (a request sent, the socket dropped). Every good
/// request gets the answer it gets alone, every hostile one its 4xx or its cut-off, and SIGTERM then finishes
/// within the grace period although slow clients still hold connections.
#[test]
fn good_clients_get_correct_answers_beside_slow_bombing_and_disconnecting_ones() {
    let mut server = Server::start(&[
        "--header-timeout-secs",
        "2",
        "--body-timeout-secs",
        "2",
        "--shutdown-grace-secs",
        "3",
    ]);
    let alone = server.post_json("/v1/chat/completions", &chat_body(6, false));
    let want = alone["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let bomb = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": gif_frame_bomb()}}, {"type": "text", "text": "hi"}]}],
        "max_tokens": 2});
    let good = chat_body(6, false);
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for _ in 0..6 {
            handles.push(s.spawn(|| {
                for _ in 0..3 {
                    let v = server.post_json("/v1/chat/completions", &good);
                    assert_eq!(v["choices"][0]["message"]["content"], want.as_str(), "a good answer changed");
                }
            }));
        }
        for _ in 0..3 {
            handles.push(s.spawn(|| {
                for _ in 0..3 {
                    let (status, text) = server.post("/v1/chat/completions", &bomb.to_string());
                    assert_eq!(status, 400, "{text}");
                }
            }));
            handles.push(s.spawn(|| {
                let mut slow = raw_connection(&server, b"");
                for b in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n".iter().take(12) {
                    if slow.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
                assert!(closed_within(slow, Duration::from_secs(6)), "a trickling client held its connection");
            }));
            handles.push(s.spawn(|| {
                let mut huge = raw_connection(
                    &server,
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n",
                );
                huge.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut answer = [0u8; 64];
                let n = huge.read(&mut answer).unwrap_or(0);
                assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 413"));
            }));
            handles.push(s.spawn(|| {
                for _ in 0..3 {
                    let body = chat_body(64, false).to_string();
                    let head = format!(
                        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    let mut c = raw_connection(&server, head.as_bytes());
                    c.write_all(body.as_bytes()).unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                    drop(c);
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
    });
    // The server still answers, then shuts down in time with a trickling client connected.
    let v = server.post_json("/v1/chat/completions", &good);
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    let _holder = raw_connection(&server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n");
    let term = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap().success());
    while server.child.try_wait().unwrap().is_none() {
        assert!(term.elapsed() < Duration::from_secs(8), "shutdown did not finish within the grace period");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A request whose client leaves while its remote image is still arriving stops fetching it: the image server sees
/// its connection closed within seconds, not at --image-fetch-timeout-secs.
#[test]
fn a_client_that_leaves_stops_its_remote_image_fetch() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static STARTED: AtomicBool = AtomicBool::new(false);
    static CLOSED: AtomicBool = AtomicBool::new(false);
    let trickle = hostile_http(|mut s| {
        STARTED.store(true, Ordering::SeqCst);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
        for _ in 0..600 {
            std::thread::sleep(Duration::from_millis(100));
            if s.write_all(b"x").is_err() {
                CLOSED.store(true, Ordering::SeqCst);
                return;
            }
        }
    });
    let server = Server::start(&["--allow-remote-images", "--image-fetch-timeout-secs", "60"]);
    let part = json!({"type": "image_url", "image_url": {"url": format!("{trickle}/cat.png")}});
    let body = json!({"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}).to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut client = raw_connection(&server, head.as_bytes());
    client.write_all(body.as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !STARTED.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the server never fetched the image");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(client);
    let left = Instant::now();
    while !CLOSED.load(Ordering::SeqCst) {
        assert!(left.elapsed() < Duration::from_secs(10), "the fetch went on after its client left");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ok = server.post_json("/v1/chat/completions", &chat_body(2, false));
    assert!(ok["choices"][0]["message"]["content"].is_string());
}
