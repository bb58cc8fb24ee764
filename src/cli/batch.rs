//! `flamingo batch`: an offline job. Reads one request per line, runs them all through the continuous-batching
//! engine, and writes one result per line in input order. Two line formats, with the server's field names and
//! checks (`server::fields`: every field honoured or the line refused naming it):
//!
//! ```text
//! OpenAI's Batch API (as vLLM's run_batch):
//! in:  {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...], ...}}
//! out: {"id": "batch_req_…", "custom_id": "q1", "response": {"status_code": 200, "request_id": "chatcmpl-…",
//!       "body": {...the server's response...}}, "error": null}     (a refused request: its 4xx and error body)
//!
//! A completions body with image files:
//! in:  {"prompt": "User:<image>Describe this image.\nAssistant:", "images": ["shapes.png"], "max_tokens": 32,
//!       "temperature": 0.7, "seed": 1, "stop": ["\n"], "logprobs": 2, "n": 2, ...}      (all but prompt optional)
//! out: {"generated_ids": [...], "text": "...", "prompt_tokens": 18, "finish_reason": "stop"|"length"}
//!      (with "logprobs" as completions give them when asked; with n > 1, {"choices": [those]})
//!      or {"error": "line 3: ..."} for a request that cannot run (the others go on)
//! ```
//! Image paths and Batch API image URLs (`data:` URLs, or files inside the input file's folder) are resolved
//! against the input file's folder. Every input line gets its output line: a blank line, one that is not UTF-8 or
//! not a valid request is answered in place (in the Batch API's shape when the file has Batch API lines).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::backend::Backend;
use crate::cli::jsonl::{read_lines, LineGroups, LineOutcome, OrderedOutput};
use crate::cli::options::{bundled_model_dir, with_backend, BackendCommand, OpenFlamingoPartsArgs, EngineOptions, RunOptions};
use crate::error::{Error, Result};
use crate::io::image::{decode_bytes, DecodeBudget, PreparedImage};
use crate::runtime::engine::Engine;
use crate::runtime::pipeline::{ModelPaths, Pipeline};
use crate::runtime::request::GenerationOutput;
use crate::runtime::scheduler::RequestId;
use crate::server::fields::{plan, MaxTokens};
use crate::server::images::{canonical_root, ImagePolicy};
use crate::server::openai::{Api, ApiError, ChatRequest, CompletionRequest, GenerationFields};
use crate::server::{render_messages, request_of, Answer};

#[derive(clap::Args, Debug)]
pub struct BatchArgs {
    /// A Hugging Face model directory (IDEFICS, Llama 3.2 Vision) or an OpenFlamingo folder (its checkpoint.pt;
    /// default: the small IDEFICS model bundled with the repository).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    parts: OpenFlamingoPartsArgs,
    /// Requests, one JSON object per line.
    #[arg(long)]
    input: PathBuf,
    /// Results, one JSON object per line, in input order.
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    engine: EngineOptions,
    /// Refuse images with more pixels than this.
    #[arg(long, default_value_t = crate::io::image::DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
    /// Max new tokens of requests that do not say (`max_tokens`).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[command(flatten)]
    run: RunOptions,
}

/// A completions body with image files (the file's own format).
#[derive(Deserialize, Debug)]
struct FileRequest {
    prompt: String,
    #[serde(default)]
    images: Vec<PathBuf>,
    #[serde(flatten)]
    fields: GenerationFields,
}

/// A line of OpenAI's Batch API input.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct BatchApiLine {
    custom_id: String,
    method: String,
    url: String,
    body: Value,
}

pub fn run(args: BatchArgs) -> Result<()> {
    let paths = args.parts.paths(&args.model.clone().map_or_else(bundled_model_dir, Ok)?);
    with_backend(&args.run.clone(), &paths.clone(), Batch { args, paths })
}

struct Batch {
    args: BatchArgs,
    paths: ModelPaths,
}

impl BackendCommand for Batch {
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        run_on(self.args, self.paths, backend)
    }
}

/// How a line's result is written.
enum Shape {
    File(Answer),
    BatchApi { custom_id: String, answer: Answer },
}

fn run_on<B: Backend>(args: BatchArgs, paths: ModelPaths, backend: B) -> Result<()> {
    let mut pipeline = Pipeline::load_paths(&paths, backend, false)?;
    pipeline.max_image_pixels = args.max_image_pixels;
    let config = args.engine.config(&pipeline)?;
    let lines = read_lines(&args.input)?;
    let batch_api = lines.iter().flatten().any(|l| {
        serde_json::from_str::<Value>(l).is_ok_and(|v| v.get("custom_id").is_some())
    });
    let base = args.input.parent().unwrap_or(Path::new(".")).to_path_buf();
    let job = Job {
        p: &pipeline,
        base: base.clone(),
        images: batch_images(&base, args.max_image_pixels)?,
        max_tokens: MaxTokens {
            default: args.max_new_tokens,
            limit: pipeline.model().context_len(),
        },
        batch_api,
    };
    let mut out = OrderedOutput::create(&args.output, lines.len(), "requests")?;
    let start = Instant::now();
    let mut engine = Engine::new(&pipeline, config)?;
    let mut groups: LineGroups<Shape> = LineGroups::new();
    let (mut next, mut failed, mut prompt_tokens, mut generated_tokens) = (0, 0, 0, 0);
    // Keep the queue about two batches deep so preprocessed images of far-away lines do not pile up in memory.
    let queue_depth = 2 * engine.config().max_seqs;
    while next < lines.len() || engine.pending_requests() > 0 {
        while next < lines.len() && groups.requests() < queue_depth {
            let queued = match &lines[next] {
                Ok(text) => job.queue(&mut engine, text).map_err(|(mut e, custom_id)| {
                    e.message = format!("line {}: {}", next + 1, e.message);
                    (e, custom_id)
                }),
                Err(message) => Err((ApiError::bad(message.clone()), None)),
            };
            match queued {
                Ok((ids, shape)) => groups.add(next, &ids, shape),
                Err((error, custom_id)) => {
                    failed += 1;
                    out.record(next, job.refusal(&error, custom_id))?;
                }
            }
            next += 1;
        }
        for event in engine.step()? {
            match groups.take(event, |id| {
                engine.cancel(id);
            }) {
                None => {}
                Some(LineOutcome::Done(line, shape, outputs)) => {
                    prompt_tokens += outputs.iter().map(|o| o.prompt_ids.len()).sum::<usize>();
                    generated_tokens += outputs.iter().map(|o| o.generated_ids.len()).sum::<usize>();
                    out.record(line, job.result(shape, &outputs))?;
                }
                Some(LineOutcome::Failed(line, shape, message)) => {
                    failed += 1;
                    let custom_id = match shape {
                        Shape::BatchApi { custom_id, .. } => Some(custom_id),
                        Shape::File(_) => None,
                    };
                    let error = ApiError::internal(format!("line {}: {message}", line + 1));
                    out.record(line, job.refusal(&error, custom_id))?;
                }
            }
        }
    }
    out.finish()?;
    let seconds = start.elapsed().as_secs_f64();
    let n = out.len();
    let per_s = |x: usize| x as f64 / seconds.max(1e-9);
    eprintln!(
        "{n} requests ({failed} failed) in {seconds:.2} s: {:.1} requests/s, prompt {:.0} tokens/s, \
         generated {:.0} tokens/s, {} preemptions; {}",
        per_s(n),
        per_s(prompt_tokens),
        per_s(generated_tokens),
        engine.preemptions(),
        engine.stats().cache_summary(),
    );
    Ok(())
}

/// Images of Batch API bodies: `data:` URLs, or files inside the input's folder.
fn batch_images(base: &Path, max_pixels: u64) -> Result<ImagePolicy> {
    let folder = if base.as_os_str().is_empty() { Path::new(".") } else { base };
    Ok(ImagePolicy {
        local_root: Some(canonical_root(folder)?),
        allow_remote: false,
        fetch_timeout: Duration::from_secs(30),
        max_bytes: 256 << 20,
        max_pixels,
        max_images: 256,
        decode_budget: Arc::new(DecodeBudget::new(decode_bytes(max_pixels))),
    })
}

/// What every line of a job shares.
struct Job<'p, B: Backend> {
    p: &'p Pipeline<B>,
    base: PathBuf,
    images: ImagePolicy,
    max_tokens: MaxTokens,
    batch_api: bool,
}

/// Why a line cannot run, and its `custom_id` where it has one.
type Refusal = (ApiError, Option<String>);

impl<B: Backend> Job<'_, B> {
    /// Parses a line, prepares its prompt and images, and queues its choices.
    fn queue(
        &self,
        engine: &mut Engine<'_, B>,
        text: &str,
    ) -> std::result::Result<(Vec<RequestId>, Shape), Refusal> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| (ApiError::bad(format!("bad request: {e}")), None))?;
        if value.get("custom_id").is_some() {
            let line: BatchApiLine = serde_json::from_value(value)
                .map_err(|e| (ApiError::bad(format!("bad Batch API line: {e}")), None))?;
            return self.queue_batch_api(engine, line);
        }
        let engine_error = |e: Error| (ApiError::from_engine(e), None);
        let req: FileRequest = request_of(Api::Completions, value).map_err(|e| (e, None))?;
        let images: Vec<PathBuf> = req.images.iter().map(|i| self.base.join(i)).collect();
        let (prompt, pixels) = self.p.prepare(&req.prompt, &images).map_err(engine_error)?;
        let plan = plan(Api::Completions, &req.fields, self.p.tokenizer.vocab_size(), self.max_tokens)
            .map_err(|e| (e, None))?;
        let answer = Answer::new(Api::Completions, String::new(), String::new(), &plan, req.prompt, prompt.ids.clone());
        let ids = engine.add_choices(prompt, pixels, plan.choices).map_err(engine_error)?;
        Ok((ids, Shape::File(answer)))
    }

    fn queue_batch_api(
        &self,
        engine: &mut Engine<'_, B>,
        line: BatchApiLine,
    ) -> std::result::Result<(Vec<RequestId>, Shape), Refusal> {
        let refuse = |e: ApiError| (e, Some(line.custom_id.clone()));
        if line.method != "POST" {
            return Err(refuse(ApiError::field("method", format!("{:?}: only POST", line.method))));
        }
        let (api, text, urls, fields) = match line.url.as_str() {
            "/v1/chat/completions" => {
                let req: ChatRequest = request_of(Api::Chat, line.body.clone()).map_err(refuse)?;
                let jinja = self.p.chat_template.as_ref();
                let (text, urls) =
                    render_messages(None, jinja, self.p.chat_fallback(), &req.messages).map_err(refuse)?;
                (Api::Chat, text, urls, req.fields)
            }
            "/v1/completions" => {
                let req: CompletionRequest = request_of(Api::Completions, line.body.clone()).map_err(refuse)?;
                let text = req.prompt.single().map_err(refuse)?;
                (Api::Completions, text, req.images, req.fields)
            }
            other => {
                return Err(refuse(ApiError::field(
                    "url",
                    format!("{other:?}: expected /v1/chat/completions or /v1/completions"),
                )))
            }
        };
        if fields.stream {
            return Err(refuse(ApiError::field("stream", "a batch does not stream")));
        }
        let plan = plan(api, &fields, self.p.tokenizer.vocab_size(), self.max_tokens).map_err(refuse)?;
        let prompt = self.p.prompt_for(&text, urls.len()).map_err(|e| refuse(ApiError::from_engine(e)))?;
        let pixels: Vec<PreparedImage> = self
            .images
            .load_all(&urls, |image| self.p.preprocessor.prepare(image), &AtomicBool::new(false))
            .map_err(refuse)?;
        let kind = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
        let id = format!("{kind}-{}", line.custom_id);
        let model = fields.model.clone().unwrap_or_else(|| self.model_name());
        let answer = Answer::new(api, id, model, &plan, text, prompt.ids.clone());
        let ids = engine
            .add_choices(prompt, pixels, plan.choices)
            .map_err(|e| refuse(ApiError::from_engine(e)))?;
        Ok((ids, Shape::BatchApi { custom_id: line.custom_id, answer }))
    }

    fn model_name(&self) -> String {
        let dir = self.p.dir.canonicalize().unwrap_or(self.p.dir.clone());
        dir.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
    }

    /// A finished line's output.
    fn result(&self, shape: Shape, outputs: &[GenerationOutput]) -> Value {
        match shape {
            Shape::BatchApi { custom_id, answer } => match answer.body(&self.p.tokenizer, outputs) {
                Ok(body) => json!({"id": format!("batch_req_{custom_id}"), "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": answer.id, "body": body}, "error": null}),
                Err(e) => self.refusal(&e, Some(custom_id)),
            },
            Shape::File(answer) => {
                let choices: std::result::Result<Vec<Value>, ApiError> = outputs
                    .iter()
                    .enumerate()
                    .map(|(i, out)| Ok(file_choice(out, answer.choice(&self.p.tokenizer, i, out)?.logprobs)))
                    .collect();
                match choices.map(<[Value; 1]>::try_from) {
                    Ok(Ok([one])) => one,
                    Ok(Err(many)) => json!({ "choices": many }),
                    Err(e) => self.refusal(&e, None),
                }
            }
        }
    }

    /// A line that cannot run, in the file's shape.
    fn refusal(&self, e: &ApiError, custom_id: Option<String>) -> Value {
        match self.batch_api {
            true => json!({"id": custom_id.as_ref().map(|c| format!("batch_req_{c}")), "custom_id": custom_id,
                "response": {"status_code": e.status.as_u16(), "request_id": null, "body": e.body()},
                "error": null}),
            false => json!({ "error": e.message }),
        }
    }
}

/// A choice in the file's own shape (its log-probabilities as completions give them, when asked).
fn file_choice(out: &GenerationOutput, logprobs: Option<Value>) -> Value {
    let mut v = json!({
        "generated_ids": out.generated_ids,
        "text": out.text,
        "prompt_tokens": out.prompt_ids.len(),
        "finish_reason": out.finish_reason.as_str(),
    });
    if let Some(logprobs) = logprobs {
        v["logprobs"] = logprobs;
    }
    v
}
