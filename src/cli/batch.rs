//! `flamingo batch`: an offline job. Reads one JSON request per line, runs them all through the continuous-batching
//! engine, and writes one JSON result per line in input order:
//!
//! ```text
//! in:  {"prompt": "User:<image>Describe this image.\nAssistant:", "images": ["shapes.png"], "max_new_tokens": 32,
//!       "temperature": 0.7, "top_k": 50, "top_p": 0.9, "seed": 1, "stop": ["\n"]}     (all but prompt optional)
//! out: {"generated_ids": [...], "text": "...", "prompt_tokens": 18, "finish_reason": "stop"|"length"}
//!      or {"error": "line 3: ..."} for a request that cannot run (the others go on)
//! ```
//! Relative image paths are resolved against the input file's folder. Every input line gets its output line: a
//! blank line, one that is not UTF-8 or not a valid request is answered `{"error": ...}` in place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use serde_json::json;

use crate::backend::Backend;
use crate::cli::options::{
    bundled_model_dir, with_backend, BackendCommand, EngineOptions, RunOptions,
};
use crate::cli::jsonl::{read_lines, OrderedOutput};
use crate::error::{Error, Result};
use crate::model::sampling::SamplingParams;
use crate::runtime::engine::{Engine, Event};
use crate::runtime::pipeline::Pipeline;
use crate::runtime::request::{GenerationOutput, GenerationRequest};
use crate::runtime::scheduler::RequestId;

#[derive(clap::Args, Debug)]
pub struct BatchArgs {
    /// A Hugging Face model directory, IDEFICS or Llama 3.2 Vision (default: the small model bundled with the repository).
    #[arg(long)]
    model: Option<PathBuf>,
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
    /// Max new tokens of requests that do not say.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[command(flatten)]
    run: RunOptions,
}

/// One line of the input.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    prompt: String,
    #[serde(default)]
    images: Vec<PathBuf>,
    max_new_tokens: Option<usize>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
}

pub fn run(args: BatchArgs) -> Result<()> {
    let dir = args.model.clone().unwrap_or_else(bundled_model_dir);
    with_backend(&args.run.clone(), &dir.clone(), Batch { args, dir })
}

struct Batch {
    args: BatchArgs,
    dir: PathBuf,
}

impl BackendCommand for Batch {
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        run_on(self.args, self.dir, backend)
    }
}

fn run_on<B: Backend>(args: BatchArgs, dir: PathBuf, backend: B) -> Result<()> {
    let mut pipeline = Pipeline::load(&dir, backend, false)?;
    pipeline.max_image_pixels = args.max_image_pixels;
    let config = args.engine.config(&pipeline)?;
    let lines = read_lines(&args.input)?;
    let mut job = Job {
        out: OrderedOutput::create(&args.output, lines.len(), "requests")?,
        prompt_tokens: 0,
        generated_tokens: 0,
        failed: 0,
    };
    let start = Instant::now();
    let mut engine = Engine::new(&pipeline, config)?;
    let base = args.input.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut line_of: HashMap<RequestId, usize> = HashMap::new();
    let mut next = 0;
    // Keep the queue about two batches deep so preprocessed images of far-away lines do not pile up in memory.
    let queue_depth = 2 * engine.config().max_seqs;
    while next < lines.len() || engine.pending_requests() > 0 {
        while next < lines.len() && engine.pending_requests() < queue_depth {
            let admitted = lines[next]
                .as_ref()
                .map_err(String::clone)
                .and_then(|text| {
                    admit(&mut engine, &pipeline, text, &base, args.max_new_tokens)
                        .map_err(|e| format!("line {}: {e}", next + 1))
                });
            match admitted {
                Ok(id) => {
                    line_of.insert(id, next);
                }
                Err(message) => job.fail(next, message)?,
            }
            next += 1;
        }
        for event in engine.step()? {
            match event {
                Event::Finished { id, output } => {
                    let line = line_of.remove(&id).expect("every request has a line");
                    job.succeed(line, &output)?;
                }
                Event::Failed { id, message } => {
                    let line = line_of.remove(&id).expect("every request has a line");
                    job.fail(line, format!("line {}: {message}", line + 1))?;
                }
                Event::Text { .. } | Event::Started { .. } | Event::Logprobs { .. } | Event::PromptLogprobs { .. } => {}
            }
        }
    }
    job.out.finish()?;
    job.summary(start.elapsed().as_secs_f64(), engine.preemptions());
    Ok(())
}

/// Parses one request line, preprocesses its images and queues it.
fn admit<B: Backend>(
    engine: &mut Engine<'_, B>,
    p: &Pipeline<B>,
    line: &str,
    base: &Path,
    default_max_new: usize,
) -> Result<RequestId> {
    let req: BatchRequest =
        serde_json::from_str(line).map_err(|e| Error::Invalid(format!("bad request: {e}")))?;
    let images: Vec<PathBuf> = req.images.iter().map(|i| base.join(i)).collect();
    let (prompt, pixels) = p.prepare(&req.prompt, &images)?;
    let defaults = SamplingParams::default();
    let request = GenerationRequest {
        max_new_tokens: req.max_new_tokens.unwrap_or(default_max_new),
        sampling: SamplingParams {
            temperature: req.temperature.unwrap_or(defaults.temperature),
            top_k: req.top_k.unwrap_or(defaults.top_k),
            top_p: req.top_p.unwrap_or(defaults.top_p),
            repetition_penalty: req
                .repetition_penalty
                .unwrap_or(defaults.repetition_penalty),
            seed: req.seed.unwrap_or(defaults.seed),
            ..SamplingParams::default()
        },
        stop: req.stop,
        ignore_eos: false,
        prompt_logprobs: None,
    };
    engine.add_request(prompt, pixels, &request)
}

/// Results written in input order, and the job's counters.
struct Job {
    out: OrderedOutput,
    prompt_tokens: usize,
    generated_tokens: usize,
    failed: usize,
}

impl Job {
    fn succeed(&mut self, line: usize, out: &GenerationOutput) -> Result<()> {
        self.prompt_tokens += out.prompt_ids.len();
        self.generated_tokens += out.generated_ids.len();
        let value = json!({
            "generated_ids": out.generated_ids,
            "text": out.text,
            "prompt_tokens": out.prompt_ids.len(),
            "finish_reason": out.finish_reason.as_str(),
        });
        self.out.record(line, value)
    }

    fn fail(&mut self, line: usize, message: String) -> Result<()> {
        self.failed += 1;
        self.out.record(line, json!({ "error": message }))
    }

    fn summary(&self, seconds: f64, preemptions: usize) {
        let n = self.out.len();
        let per_s = |x: usize| x as f64 / seconds.max(1e-9);
        eprintln!(
            "{n} requests ({} failed) in {seconds:.2} s: {:.1} requests/s, prompt {:.0} tokens/s, \
             generated {:.0} tokens/s, {preemptions} preemptions",
            self.failed,
            per_s(n),
            per_s(self.prompt_tokens),
            per_s(self.generated_tokens),
        );
    }
}
