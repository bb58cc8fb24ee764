//! `flamingo score`: likelihood scoring, the Flamingo way to classify and retrieve. Each input line gives images, a
//! prompt and candidate texts; each output line (in input order) gives every candidate's log-probability given the
//! images and the prompt, and the candidates ranked best first:
//!
//! ```text
//! in:  {"images": ["cat.png"], "prompt": "User:<image>What is this?<end_of_utterance>\nAssistant:",
//!       "candidates": [" a cat.", " a dog."]}
//! out: {"scores": [{"candidate": " a cat.", "logprob": -0.7, "mean_logprob": -0.23, "tokens": 3}, ...],
//!       "ranking": [0, 1]}                           or {"error": "line 3: ..."} in place
//! ```
//! A candidate's tokens are those of `prompt + candidate` past the tokens it shares with the prompt alone;
//! `logprob` is their summed log-probability (the raw model distribution, as OpenFlamingo's evaluation scores),
//! `mean_logprob` that over `tokens`; the ranking orders by `logprob`, lower index first among equals. The prompt
//! and its images run once per line and every candidate forks from them ([`Engine::add_forked`]); the candidates
//! of many lines run batched.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::backend::Backend;
use crate::cli::jsonl::{read_lines, LineGroups, LineOutcome, OrderedOutput};
use crate::cli::options::{bundled_model_dir, with_backend, BackendCommand, OpenFlamingoPartsArgs, EngineOptions, RunOptions};
use crate::error::{Error, Result};
use crate::runtime::engine::{Engine, ForkedRequest};
use crate::runtime::pipeline::{ModelPaths, Pipeline};
use crate::runtime::request::{GenerationOutput, GenerationRequest};
use crate::runtime::scheduler::RequestId;

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// A Hugging Face model directory (IDEFICS, Llama 3.2 Vision) or an OpenFlamingo folder (its checkpoint.pt;
    /// default: the small IDEFICS model bundled with the repository).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    parts: OpenFlamingoPartsArgs,
    /// One JSON object per line: `images` (paths, relative to this file's folder), `prompt`, `candidates`.
    #[arg(long)]
    input: PathBuf,
    /// One JSON object per line, in input order: `scores` and `ranking`, or `error`.
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    engine: EngineOptions,
    /// Refuse images with more pixels than this.
    #[arg(long, default_value_t = crate::io::image::DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
    #[command(flatten)]
    run: RunOptions,
}

/// One line of the input.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ScoreRequest {
    #[serde(default)]
    images: Vec<PathBuf>,
    prompt: String,
    candidates: Vec<String>,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let paths = args.parts.paths(&args.model.clone().map_or_else(bundled_model_dir, Ok)?);
    with_backend(&args.run.clone(), &paths.clone(), Score { args, paths })
}

struct Score {
    args: ScoreArgs,
    paths: ModelPaths,
}

impl BackendCommand for Score {
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        run_on(self.args, self.paths, backend)
    }
}

fn run_on<B: Backend>(args: ScoreArgs, paths: ModelPaths, backend: B) -> Result<()> {
    let mut pipeline = Pipeline::load_paths(&paths, backend, false)?;
    pipeline.max_image_pixels = args.max_image_pixels;
    let config = args.engine.config(&pipeline)?;
    let lines = read_lines(&args.input)?;
    let mut out = OrderedOutput::create(&args.output, lines.len(), "lines")?;
    let start = Instant::now();
    let mut engine = Engine::new(&pipeline, config)?;
    let base = args.input.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut groups: LineGroups<Vec<String>> = LineGroups::new();
    let (mut next, mut candidates, mut failed) = (0, 0, 0);
    // About two batches of candidates queued, so that preprocessed images of far-away lines do not pile up.
    let queue_depth = 2 * engine.config().max_seqs;
    while next < lines.len() || engine.pending_requests() > 0 {
        while next < lines.len() && groups.requests() < queue_depth {
            let queued = lines[next].as_ref().map_err(String::clone).and_then(|text| {
                queue(&mut engine, &pipeline, text, &base).map_err(|e| format!("line {}: {e}", next + 1))
            });
            match queued {
                Ok((ids, line)) => {
                    candidates += ids.len();
                    groups.add(next, &ids, line);
                }
                Err(message) => {
                    failed += 1;
                    out.record(next, json!({ "error": message }))?;
                }
            }
            next += 1;
        }
        for event in engine.step()? {
            match groups.take(event, |id| {
                engine.cancel(id);
            }) {
                None => {}
                Some(LineOutcome::Done(line, texts, outputs)) => {
                    out.record(line, line_result(&texts, &outputs))?;
                }
                Some(LineOutcome::Failed(line, _, message)) => {
                    failed += 1;
                    out.record(line, json!({ "error": format!("line {}: {message}", line + 1) }))?;
                }
            }
        }
    }
    out.finish()?;
    let seconds = start.elapsed().as_secs_f64();
    let stats = engine.stats();
    eprintln!(
        "{} lines ({failed} failed), {candidates} candidates in {seconds:.2} s: {:.1} candidates/s; \
         {} prompt rows shared by forks, {} preemptions; {}",
        out.len(),
        candidates as f64 / seconds.max(1e-9),
        stats.shared_prefix_rows,
        stats.preemptions,
        stats.cache_summary(),
    );
    Ok(())
}

/// Parses a line, prepares its prompt, images and candidates, and queues them: the prompt as a shared prefix,
/// each candidate forked from it.
fn queue<B: Backend>(
    engine: &mut Engine<'_, B>,
    p: &Pipeline<B>,
    text: &str,
    base: &Path,
) -> Result<(Vec<RequestId>, Vec<String>)> {
    let req: ScoreRequest =
        serde_json::from_str(text).map_err(|e| Error::Invalid(format!("bad request: {e}")))?;
    if req.candidates.is_empty() {
        return Err(Error::Invalid("candidates: the list is empty".into()));
    }
    let images: Vec<PathBuf> = req.images.iter().map(|i| base.join(i)).collect();
    let (prefix, pixels) = p.prepare(&req.prompt, &images)?;
    let mut children = Vec::with_capacity(req.candidates.len());
    for (k, candidate) in req.candidates.iter().enumerate() {
        let full = p.prompt_for(&format!("{}{candidate}", req.prompt), images.len())?;
        let shared = full.ids.iter().zip(&prefix.ids).take_while(|(a, b)| a == b).count();
        if shared == full.ids.len() {
            return Err(Error::Invalid(format!(
                "candidates[{k}]: {candidate:?} adds no token to the prompt"
            )));
        }
        let request = GenerationRequest {
            max_new_tokens: 0,
            prompt_logprobs: Some(0),
            ..Default::default()
        };
        children.push(ForkedRequest { prompt: full, request, scored_from: shared });
    }
    let ids = engine.add_forked(prefix, pixels, children)?;
    Ok((ids, req.candidates))
}

/// A candidate's summed log-probability and its token count.
fn candidate_score(out: &GenerationOutput) -> (f64, usize) {
    let sum = out.prompt_logprobs.iter().map(|l| l.logprob as f64).sum();
    (sum, out.prompt_logprobs.len())
}

fn line_result(candidates: &[String], outputs: &[GenerationOutput]) -> Value {
    let scores: Vec<(f64, usize)> = outputs.iter().map(candidate_score).collect();
    let mut ranking: Vec<usize> = (0..scores.len()).collect();
    ranking.sort_by(|&a, &b| scores[b].0.total_cmp(&scores[a].0).then(a.cmp(&b)));
    let scores: Vec<Value> = candidates
        .iter()
        .zip(&scores)
        .map(|(c, &(logprob, tokens))| {
            json!({"candidate": c, "logprob": logprob, "mean_logprob": logprob / tokens as f64,
                   "tokens": tokens})
        })
        .collect();
    json!({ "scores": scores, "ranking": ranking })
}
