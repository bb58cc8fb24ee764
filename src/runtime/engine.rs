//! The continuous-batching engine: many requests share every decoder step. It executes the plans of the
//! scheduler (`runtime::scheduler`: admission, chunked prefill, preemption, block and slot allocation), which
//! holds no tensor; the engine holds the model's caches and each request's pixels, sampler and text stream.
//!
//! Each call to [`Engine::step`] takes the scheduler's plan and:
//! 1. reports the requests that asked for no new tokens as finished;
//! 2. encodes the images of the requests admitted for the first time, all together: vision encoder and
//!    resampler, then every cross-attention block's K/V once for all of them into the media cache, where it stays
//!    for the request's life;
//! 3. runs one forward pass over all planned rows and samples every finished row on the backend in one call, each
//!    with its request's own rule and generator (so a seeded request gives the same tokens whatever else shares
//!    the batch), and reports text and completions. A step of decodes only (one row per sequence, at most
//!    [`MAX_RECORDED_SEQS`]) runs through the backend's recorded steps where it has them (CUDA graphs): padded to
//!    the next power of two with rows on the KV cache's padding block, recorded the first time, replayed after.
//!
//! A request's output does not depend on what it is batched with: every op computes a row the same way whatever
//! rows share its launch (tested in `tests/batch_invariance.rs`).

use std::collections::HashMap;

use crate::io::image::PreparedImage;
use crate::backend::cpu::sampling::token_logprobs;
use crate::backend::{Backend, RowSampling, Sampled, SeqStep, StepLayout, TokenLogprobs};
use crate::cache::content::{image_key, ContentKey};
use crate::cache::kv_cache::PagedKvCache;
use crate::cache::media_cache::MediaCache;
use crate::error::{Error, Result};
use crate::io::prompt::EncodedPrompt;
use crate::io::tokenizer::Tokenizer;
use crate::model::sampling::{Sampler, MAX_TOP_LOGPROBS};
use crate::model::{encode_images_into, set_image_views};
use crate::runtime::pipeline::Pipeline;
use crate::runtime::recorded::{decode_shape, padded, recorded_logits, MAX_RECORDED_SEQS};
use crate::runtime::request::{FinishReason, GenerationOutput, GenerationRequest};
use crate::runtime::scheduler::{
    CacheStats, Fork, Limits, MediaJob, RequestId, Scheduler, SeqState, StepPlan,
};
use crate::runtime::stream::TextStream;

/// Capacity and batching limits of an engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Positions per KV-cache block.
    pub block_size: usize,
    /// Blocks in the KV pool (shared by all sequences).
    pub kv_blocks: usize,
    /// Images the media cache holds at once.
    pub media_slots: usize,
    /// Sequences per step at most.
    pub max_seqs: usize,
    /// Rows (prompt and decode tokens together) per step at most.
    pub max_step_tokens: usize,
    /// Whether decode steps are recorded once per batch size and replayed (CUDA graphs), where the backend can.
    pub decode_graphs: bool,
    /// Whether prompt blocks and images are cached by content and reused across requests (prefix caching and the
    /// media cache by content); outputs are the same bits either way.
    pub prefix_cache: bool,
}

impl EngineConfig {
    /// Limits for `max_seqs` concurrent sequences whose KV pool takes at most `kv_bytes` (each block costs
    /// `block_bytes`), never more than `max_seqs` full contexts need.
    pub fn sized(
        max_seqs: usize,
        context: usize,
        block_size: usize,
        block_bytes: usize,
        kv_bytes: usize,
    ) -> Self {
        let full = max_seqs * context.div_ceil(block_size);
        EngineConfig {
            block_size,
            kv_blocks: (kv_bytes / block_bytes.max(1)).clamp(1, full.max(1)),
            media_slots: 4 * max_seqs,
            max_seqs,
            max_step_tokens: 2048,
            decode_graphs: true,
            prefix_cache: true,
        }
    }
}

impl EngineConfig {
    fn limits(&self) -> Limits {
        Limits {
            block_size: self.block_size,
            kv_blocks: self.kv_blocks,
            media_slots: self.media_slots,
            max_seqs: self.max_seqs,
            max_step_tokens: self.max_step_tokens,
            prefix_cache: self.prefix_cache,
        }
    }
}

/// A snapshot of an engine's occupancy (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub media_slots_used: usize,
    pub preemptions: usize,
    /// Steps run from a recording (CUDA graph replays, and the step each recording was made on).
    pub recorded_steps: usize,
    /// Images run through the vision tower and the cross-attention K/V projections since the engine started
    /// (each request's images once, at admission; a shared prefix's once for all requests forked from it).
    pub images_encoded: usize,
    /// Prompt rows that requests forked from a shared prefix did not compute (their shared KV blocks' rows).
    pub shared_prefix_rows: usize,
    /// KV blocks holding cached prompt content (in use or idle).
    pub kv_blocks_cached: usize,
    /// What the prefix and media caches saved.
    pub cache: CacheStats,
}

impl EngineStats {
    /// Prompt rows not computed: prefix-cache hits and the rows forks shared.
    pub fn prefill_rows_saved(&self) -> usize {
        self.cache.prefix_hit_rows + self.shared_prefix_rows
    }

    /// One line on what the caches saved, for the summaries of `batch`, `score` and `bench`.
    pub fn cache_summary(&self) -> String {
        let c = &self.cache;
        let pct = |hits: usize, of: usize| 100.0 * hits as f64 / of.max(1) as f64;
        format!(
            "prefix cache {} of {} prompt rows ({:.1}%), media cache {} of {} images ({:.1}%), {} prefill rows \
             saved, {} images encoded",
            c.prefix_hit_rows,
            c.admitted_rows,
            pct(c.prefix_hit_rows, c.admitted_rows),
            c.media_hits,
            c.admitted_images,
            pct(c.media_hits, c.admitted_images),
            self.prefill_rows_saved(),
            self.images_encoded,
        )
    }
}

/// What the engine reports after a step.
#[derive(Clone, Debug)]
pub enum Event {
    /// A request's rows run for the first time (it has left the queue).
    Started { id: RequestId },
    /// A new token's log-probabilities, as it is sampled (only for requests that asked for them): before the
    /// text it adds, which may come in a later event (text held back by a stop string).
    Logprobs {
        id: RequestId,
        logprobs: TokenLogprobs,
    },
    /// The log-probabilities of a request's prompt tokens after the first (requests that asked for them), once
    /// its prompt has run: before any of its text.
    PromptLogprobs {
        id: RequestId,
        logprobs: Vec<TokenLogprobs>,
    },
    /// More of a request's text (never part of a stop string).
    Text { id: RequestId, delta: String },
    /// A request is complete; its blocks and media slots are already free.
    Finished {
        id: RequestId,
        output: GenerationOutput,
    },
    /// A request failed on its own (e.g. its logits left nothing to sample) and is dropped; the others go on.
    Failed { id: RequestId, message: String },
}

/// What the engine keeps of a request beside the scheduler's state.
struct Request {
    /// Preprocessed images, until they are encoded.
    pixels: Vec<PreparedImage>,
    /// Per image: seen together with the previous one (the prompt's `joins_previous`).
    joins_previous: Vec<bool>,
    sampler: Sampler,
    stream: TextStream,
    stop_ids: Vec<u32>,
    /// Of each prompt token after the first, once computed (when the request asked for them).
    prompt_logprobs: Option<PromptLogprobs>,
    /// Each generated token's, when the request's sampling asks for them.
    logprobs: Vec<TokenLogprobs>,
    /// Whether its rows have run yet.
    started: bool,
    /// A shared prefix's requests to start from it once it has run (see [`Engine::add_forked`]); the prefix
    /// itself reports nothing.
    forks: Option<Vec<PendingFork>>,
    /// Asked for no new token, only the prompt's log-probabilities: one token is sampled to run the prompt
    /// through the scheduler's usual path, and dropped.
    scores_only: bool,
}

/// A request waiting for its shared prefix to run.
struct PendingFork {
    id: RequestId,
    prompt: EncodedPrompt,
    request: GenerationRequest,
    /// The prompt's first token whose log-probability is reported (with `request.prompt_logprobs`).
    scored_from: usize,
    shared_blocks: usize,
    capacity: usize,
}

/// A request to start from a shared prefix ([`Engine::add_forked`]).
#[derive(Clone, Debug)]
pub struct ForkedRequest {
    /// Starts with the prefix's tokens (up to where they agree: the shared part ends there) and has its images.
    pub prompt: EncodedPrompt,
    pub request: GenerationRequest,
    /// With `request.prompt_logprobs`: the first prompt token whose log-probability is reported (1: all of them;
    /// a scored candidate's first token). The prefix is shared only up to the row before it.
    pub scored_from: usize,
}

/// A request's prompt log-probabilities as its prefill chunks compute them (a preempted request computes its
/// prompt again: a position already set is kept; the values are the same bit for bit).
struct PromptLogprobs {
    prompt: Vec<u32>,
    top: usize,
    /// Positions before it are not reported (position `p` predicts token `p + 1`).
    first: usize,
    /// Position `p` holds the log-probability of token `p + 1`.
    at: Vec<Option<TokenLogprobs>>,
}

impl PromptLogprobs {
    /// Rows of a step's chunk `positions` that predict a prompt token and are not computed yet.
    fn wanted(&self, positions: std::ops::Range<usize>) -> impl Iterator<Item = usize> + '_ {
        positions.filter(|&p| p >= self.first && p + 1 < self.prompt.len() && self.at[p].is_none())
    }
}

/// One step's rows as the model takes them.
struct StepInputs {
    /// Token ids of every row, sequence after sequence.
    ids: Vec<u32>,
    seqs: Vec<SeqStep>,
    /// Rows whose logits are sampled (each sequence's last row once its pending tokens are all computed).
    sample_rows: Vec<usize>,
    /// The request of each sampled row.
    sampled: Vec<RequestId>,
    /// Prompt rows whose log-probabilities are asked for: `(row, request, position)`.
    scored: Vec<(usize, RequestId, usize)>,
}

impl StepInputs {
    fn of(plan: &StepPlan, requests: &HashMap<RequestId, Request>) -> Self {
        let mut inputs = StepInputs {
            ids: Vec::new(),
            seqs: Vec::with_capacity(plan.seqs.len()),
            sample_rows: Vec::new(),
            sampled: Vec::new(),
            scored: Vec::new(),
        };
        for seq in &plan.seqs {
            if let Some(lp) = requests.get(&seq.id).and_then(|r| r.prompt_logprobs.as_ref()) {
                let first = seq.step.kv_len - seq.step.q_rows;
                let row0 = inputs.ids.len();
                inputs.scored.extend(
                    lp.wanted(first..seq.step.kv_len)
                        .map(|p| (row0 + p - first, seq.id, p)),
                );
            }
            inputs.ids.extend_from_slice(&seq.ids);
            inputs.seqs.push(seq.step.clone());
            if seq.sampled {
                inputs.sample_rows.push(inputs.ids.len() - 1);
                inputs.sampled.push(seq.id);
            }
        }
        inputs
    }
}

/// The engine over one loaded model; see the module doc for what a step does.
pub struct Engine<'p, B: Backend> {
    pipeline: &'p Pipeline<B>,
    config: EngineConfig,
    scheduler: Scheduler,
    kv: PagedKvCache<B>,
    media: MediaCache<B>,
    requests: HashMap<RequestId, Request>,
    /// The backend's recorded decode steps, when it has them and the config asks for them.
    graphs: Option<B::StepGraphs>,
    recorded_steps: usize,
    images_encoded: usize,
    /// Requests waiting for a shared prefix to run: the prefix of each.
    fork_parent: HashMap<RequestId, RequestId>,
    shared_prefix_rows: usize,
}

impl<'p, B: Backend> Engine<'p, B> {
    pub fn new(pipeline: &'p Pipeline<B>, config: EngineConfig) -> Result<Self> {
        let scheduler = Scheduler::new(config.limits())?;
        let b = &pipeline.backend;
        let graphs = (config.decode_graphs && pipeline.model().replays_decode())
            .then(|| b.new_step_graphs(pipeline.model().head_dim()))
            .flatten();
        Ok(Engine {
            graphs,
            recorded_steps: 0,
            images_encoded: 0,
            fork_parent: HashMap::new(),
            shared_prefix_rows: 0,
            scheduler,
            kv: pipeline
                .model()
                .new_kv_cache(b, config.kv_blocks, config.block_size),
            media: pipeline.model().new_media_cache(b, config.media_slots),
            requests: HashMap::new(),
            pipeline,
            config,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Requests accepted and not finished.
    pub fn pending_requests(&self) -> usize {
        self.requests.len()
    }

    pub fn running_requests(&self) -> usize {
        self.scheduler.running()
    }

    pub fn free_kv_blocks(&self) -> usize {
        self.scheduler.blocks().free_blocks()
    }

    /// Times a sequence was preempted to make room.
    pub fn preemptions(&self) -> usize {
        self.scheduler.preemptions()
    }

    /// Queue, batch and cache occupancy now.
    pub fn stats(&self) -> EngineStats {
        let (s, blocks) = (&self.scheduler, self.scheduler.blocks());
        EngineStats {
            waiting: s.waiting(),
            running: s.running(),
            kv_blocks_total: blocks.total_blocks(),
            kv_blocks_used: blocks.total_blocks() - blocks.free_blocks(),
            media_slots_used: s.media_slots_used(),
            preemptions: s.preemptions(),
            recorded_steps: self.recorded_steps,
            images_encoded: self.images_encoded,
            shared_prefix_rows: self.shared_prefix_rows,
            kv_blocks_cached: blocks.cached_blocks(),
            cache: s.cache_stats(),
        }
    }

    /// Drops a request wherever it is (queued, running, or waiting for its shared prefix) and frees what it holds;
    /// false if it is unknown or already finished. No event is reported for it afterwards.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(&prefix) = self.fork_parent.get(&id) {
            self.fork_parent.remove(&id);
            let forks = self.requests.get_mut(&prefix).and_then(|r| r.forks.as_mut());
            let forks = forks.expect("a pending fork's prefix is known");
            forks.retain(|f| f.id != id);
            if forks.is_empty() {
                self.requests.remove(&prefix);
                self.scheduler.cancel(prefix);
            }
            return true;
        }
        self.requests.remove(&id);
        self.scheduler.cancel(id).is_some()
    }

    /// Queues a prefix (a prompt and its images) that several requests start from: it runs once, then each of
    /// `children` starts from its KV blocks and its images' K/V and computes only its own rows: a few-shot
    /// prompt's candidates, a request's `n` choices. Blocks are shared whole, and a child computes every row whose
    /// log-probability it reports, so it recomputes at most one block's rows of the prefix. Returns the
    /// children's ids, in order; the prefix reports no event. Each child is checked as
    /// [`Engine::add_request`] checks a request, and must have the prefix's images.
    pub fn add_forked(
        &mut self,
        prefix: EncodedPrompt,
        pixels: Vec<PreparedImage>,
        children: Vec<ForkedRequest>,
    ) -> Result<Vec<RequestId>> {
        if children.is_empty() {
            return Err(Error::Invalid("a shared prefix with no request to start from it".into()));
        }
        let bs = self.config.block_size;
        let mut pending = Vec::with_capacity(children.len());
        for (i, child) in children.into_iter().enumerate() {
            let c = &child.prompt;
            self.check_request(c, pixels.len(), &child.request)?;
            if c.num_images != prefix.num_images || c.joins_previous != prefix.joins_previous {
                return Err(Error::Prompt(format!(
                    "request {i} of the shared prefix has {} images, the prefix {}",
                    c.num_images, prefix.num_images
                )));
            }
            let agree = c.ids.iter().zip(&prefix.ids).take_while(|(a, b)| a == b).count();
            let mut own_from = agree.min(c.ids.len() - 1);
            if child.request.prompt_logprobs.is_some() {
                own_from = own_from.min(child.scored_from.max(1) - 1);
            }
            let capacity = self.pipeline.positions_for(c, child.request.tokens_to_run());
            self.scheduler.check_fits(c.num_images, capacity)?;
            pending.push(PendingFork {
                id: 0,
                prompt: child.prompt,
                request: child.request,
                scored_from: child.scored_from.max(1),
                shared_blocks: own_from / bs,
                capacity,
            });
        }
        let run_prefix = GenerationRequest {
            max_new_tokens: 1,
            ..GenerationRequest::default()
        };
        let parent = self.add_request(prefix, pixels, &run_prefix)?;
        let ids = self.scheduler.reserve_ids(pending.len());
        for (fork, &id) in pending.iter_mut().zip(&ids) {
            fork.id = id;
            self.fork_parent.insert(id, parent);
        }
        let request = self.requests.get_mut(&parent).expect("just added");
        request.forks = Some(pending);
        request.scores_only = true;
        Ok(ids)
    }

    /// Queues several requests of one prompt (a request's `n` choices): one is queued as it is; more fork from
    /// one run of the prompt ([`Engine::add_forked`]), except where they report the prompt's own
    /// log-probabilities (each then runs the prompt itself, which it must to compute them). Refuses all or none.
    pub fn add_choices(
        &mut self,
        prompt: EncodedPrompt,
        pixels: Vec<PreparedImage>,
        requests: Vec<GenerationRequest>,
    ) -> Result<Vec<RequestId>> {
        if requests.len() > 1 && requests.iter().all(|r| r.prompt_logprobs.is_none()) {
            let forks = requests
                .into_iter()
                .map(|request| ForkedRequest {
                    prompt: prompt.clone(),
                    request,
                    scored_from: 1,
                })
                .collect();
            return self.add_forked(prompt, pixels, forks);
        }
        let mut ids = Vec::with_capacity(requests.len());
        for request in &requests {
            match self.add_request(prompt.clone(), pixels.clone(), request) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        self.cancel(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(ids)
    }

    /// Starts the requests waiting for the prefix `parent` (which has just run) and drops the prefix.
    fn start_forks(&mut self, parent: RequestId, forks: Vec<PendingFork>, events: &mut Vec<Event>) {
        for f in forks {
            self.fork_parent.remove(&f.id);
            let fork = Fork {
                prompt: f.prompt.ids.clone(),
                image_of_token: f.prompt.image_of_token.clone(),
                shared_blocks: f.shared_blocks,
                max_new_tokens: f.request.tokens_to_run(),
                capacity: f.capacity,
                reusable: reusable_positions(&f.prompt, &f.request, f.scored_from),
            };
            if let Err(e) = self.scheduler.fork(parent, f.id, fork) {
                events.push(Event::Failed { id: f.id, message: e.to_string() });
                continue;
            }
            self.shared_prefix_rows += f.shared_blocks * self.config.block_size;
            let mut request = self.new_request(&f.prompt, Vec::new(), &f.request);
            if let Some(lp) = request.prompt_logprobs.as_mut() {
                lp.first = f.scored_from - 1;
            }
            self.requests.insert(f.id, request);
        }
        self.scheduler.finish(parent);
        self.requests.remove(&parent);
    }

    /// Queues a request; refuses one the engine could never run (prompt over the context, more images than the
    /// media cache holds, a prompt longer than the whole KV pool, invalid sampling parameters).
    pub fn add_request(
        &mut self,
        prompt: EncodedPrompt,
        pixels: Vec<PreparedImage>,
        request: &GenerationRequest,
    ) -> Result<RequestId> {
        self.check_request(&prompt, pixels.len(), request)?;
        let capacity = self.pipeline.positions_for(&prompt, request.tokens_to_run());
        let image_keys = image_keys(&pixels, &prompt.joins_previous);
        let reusable = reusable_positions(&prompt, request, 1);
        let mut state = self.new_request(&prompt, pixels, request);
        state.joins_previous = prompt.joins_previous;
        let id = self.scheduler.add(
            prompt.ids,
            prompt.image_of_token,
            image_keys,
            reusable,
            request.tokens_to_run(),
            capacity,
        )?;
        self.requests.insert(id, state);
        Ok(id)
    }

    /// Refuses a request that could never run (see [`Engine::add_request`]).
    fn check_request(
        &self,
        prompt: &EncodedPrompt,
        images: usize,
        request: &GenerationRequest,
    ) -> Result<()> {
        self.pipeline.check_prompt(prompt)?;
        request.sampling.validate().map_err(Error::Invalid)?;
        if prompt.ids.is_empty() {
            return Err(Error::Prompt("the prompt has no tokens".into()));
        }
        if images != prompt.num_images || prompt.joins_previous.len() != prompt.num_images {
            return Err(Error::Prompt(format!(
                "the prompt has {} image tokens but {images} images were given",
                prompt.num_images,
            )));
        }
        if let Some(n) = request.prompt_logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(Error::Invalid(format!(
                "prompt logprobs: at most {MAX_TOP_LOGPROBS} top tokens, got {n}"
            )));
        }
        Ok(())
    }

    /// What the engine keeps of a checked request beside the scheduler's state.
    fn new_request(
        &self,
        prompt: &EncodedPrompt,
        pixels: Vec<PreparedImage>,
        request: &GenerationRequest,
    ) -> Request {
        let tok = &self.pipeline.tokenizer;
        let prompt_logprobs = request.prompt_logprobs.map(|top| PromptLogprobs {
            at: vec![None; prompt.ids.len().saturating_sub(1)],
            prompt: prompt.ids.clone(),
            top,
            first: 0,
        });
        Request {
            pixels,
            joins_previous: Vec::new(),
            sampler: Sampler::new(request.sampling.clone(), tok.banned_ids.clone(), &prompt.ids),
            stream: TextStream::new(request.stop.clone()),
            stop_ids: match request.ignore_eos {
                true => Vec::new(),
                false => tok.stop_ids.clone(),
            },
            scores_only: request.max_new_tokens == 0 && prompt_logprobs.is_some(),
            prompt_logprobs,
            logprobs: Vec::new(),
            started: false,
            forks: None,
        }
    }

    /// Runs one step (see the module doc) and returns what happened; does nothing when no request is pending.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let plan = self.scheduler.schedule();
        for seq in &plan.finished {
            self.report_finished(seq, FinishReason::Length, &mut events)?;
        }
        self.encode_media(&plan.encode);
        if !plan.seqs.is_empty() {
            self.run(&plan, &mut events)?;
        }
        Ok(events)
    }

    /// Steps until every request is finished, handing each event to `on_event`.
    pub fn run_to_completion(&mut self, mut on_event: impl FnMut(Event)) -> Result<()> {
        while self.pending_requests() > 0 {
            for e in self.step()? {
                on_event(e);
            }
        }
        Ok(())
    }

    /// Vision encoder, resampler and cross-attention K/V of the images of the requests given that their slots do
    /// not hold already: one K/V projection per block for all of them, into the media slots the scheduler gave
    /// them; then what every row seeing each image attends to.
    fn encode_media(&mut self, jobs: &[MediaJob]) {
        let (p, b) = (self.pipeline, &self.pipeline.backend);
        let mut images = Vec::new();
        let mut joins = Vec::new();
        let mut slots = Vec::new();
        let mut encode = Vec::new();
        for job in jobs {
            let request = self
                .requests
                .get_mut(&job.id)
                .expect("scheduled requests are known");
            images.append(&mut request.pixels);
            joins.append(&mut request.joins_previous);
            slots.extend_from_slice(&job.slots);
            encode.extend_from_slice(&job.encode);
        }
        set_image_views(p.model(), &mut self.media, &images, &joins, &slots);
        let (fresh, fresh_slots): (Vec<PreparedImage>, Vec<u32>) = images
            .into_iter()
            .zip(slots)
            .zip(encode)
            .filter_map(|(image_slot, e)| e.then_some(image_slot))
            .unzip();
        if fresh.is_empty() {
            return;
        }
        encode_images_into(p.model(), b, &mut self.media, &fresh, &fresh_slots);
        self.images_encoded += fresh.len();
    }

    /// Runs the planned rows through the model and samples the sequences whose pending tokens are all computed.
    fn run(&mut self, plan: &StepPlan, events: &mut Vec<Event>) -> Result<()> {
        let inputs = StepInputs::of(plan, &self.requests);
        for seq in &plan.seqs {
            let request = self.requests.get_mut(&seq.id).expect("scheduled requests are known");
            if !request.started {
                request.started = true;
                events.push(Event::Started { id: seq.id });
            }
        }
        let (logits, scored) = self.step_logits(&inputs)?;
        self.scheduler.commit(plan);
        if let Some(scored) = scored {
            self.record_prompt_logprobs(&scored, &inputs.scored);
        }
        let Some(logits) = logits else {
            return Ok(());
        };
        let next = self.sample(&logits, &inputs.sampled);
        let mut done = Vec::new();
        for (&id, sampled) in inputs.sampled.iter().zip(next) {
            let Sampled { token, logprobs } = match sampled {
                Ok(s) => s,
                Err(e) => {
                    self.fail(id, e.to_string(), events);
                    continue;
                }
            };
            if let Some(forks) = self.requests.get_mut(&id).and_then(|r| r.forks.take()) {
                self.start_forks(id, forks, events);
                continue;
            }
            let request = self
                .requests
                .get_mut(&id)
                .expect("scheduled requests are known");
            request.sampler.observe(token);
            let seq = self.scheduler.append(id, token);
            if seq.generated().len() == 1 {
                if let Some(lp) = &request.prompt_logprobs {
                    let logprobs = lp.at.iter().flatten().cloned().collect();
                    events.push(Event::PromptLogprobs { id, logprobs });
                }
            }
            if request.scores_only {
                done.push((id, FinishReason::Length));
                continue;
            }
            if let Some(logprobs) = logprobs {
                request.logprobs.push(logprobs.clone());
                events.push(Event::Logprobs { id, logprobs });
            }
            if let Some(reason) = accept(&self.pipeline.tokenizer, seq, request, token, events)? {
                done.push((id, reason));
            }
        }
        // Newest first, as the batch's completions have always been reported.
        for &(id, reason) in done.iter().rev() {
            let seq = self.scheduler.finish(id);
            self.report_finished(&seq, reason, events)?;
        }
        Ok(())
    }

    /// The logits of the step's sampled rows (none when it only prefills) and of its scored prompt rows (none when
    /// it has none): from the recording for its batch size when every row is a decode and the backend records,
    /// else launched op by op.
    fn step_logits(
        &mut self,
        inputs: &StepInputs,
    ) -> Result<(Option<B::Tensor>, Option<B::Tensor>)> {
        let decode_only = inputs.sample_rows.len() == inputs.ids.len()
            && inputs.ids.len() <= MAX_RECORDED_SEQS
            && inputs.scored.is_empty()
            && inputs.seqs.iter().all(|s| s.kv_len > s.decode_from);
        if decode_only {
            if let Some(logits) = self.recorded_logits(inputs) {
                self.recorded_steps += 1;
                return Ok((Some(logits), None));
            }
        }
        let (p, b) = (self.pipeline, &self.pipeline.backend);
        let step = StepLayout {
            block_size: self.config.block_size,
            seqs: inputs.seqs.clone(),
        };
        let layout = b.layout(&step);
        let h = p
            .model()
            .forward(b, &inputs.ids, &step, &layout, &mut self.kv, &self.media, None)?;
        let logits_of = |rows: &[usize]| {
            (!rows.is_empty()).then(|| p.model().logits(b, &b.gather_rows(&h, rows)))
        };
        let scored_rows: Vec<usize> = inputs.scored.iter().map(|s| s.0).collect();
        Ok((logits_of(&inputs.sample_rows), logits_of(&scored_rows)))
    }

    /// Log-probabilities of the prompt tokens that the step's scored rows predict, on the host, from the raw
    /// logits (row `i` of `logits` is `scored[i]`).
    fn record_prompt_logprobs(&mut self, logits: &B::Tensor, scored: &[(usize, RequestId, usize)]) {
        let host = self.pipeline.backend.to_host(logits);
        let vocab = host.len() / scored.len().max(1);
        for (row, &(_, id, pos)) in host.chunks(vocab).zip(scored) {
            let Some(lp) = self.requests.get_mut(&id).and_then(|r| r.prompt_logprobs.as_mut()) else {
                continue;
            };
            lp.at[pos] = Some(token_logprobs(row, lp.prompt[pos + 1], lp.top));
        }
    }

    /// A decode step through the backend's recordings, `None` where it has none. Recording is an optimisation: a
    /// failure to record or replay turns recordings off and the step runs op by op, never failing a request.
    fn recorded_logits(&mut self, inputs: &StepInputs) -> Option<B::Tensor> {
        let graphs = self.graphs.as_mut()?;
        let blocks = self.scheduler.blocks();
        let padded = padded(
            inputs.ids.clone(),
            inputs.seqs.clone(),
            self.config.block_size,
            blocks.padding_block(),
        );
        let shape = decode_shape(self.pipeline.model().context_len(), blocks);
        match recorded_logits(
            self.pipeline,
            graphs,
            padded,
            shape,
            &mut self.kv,
            &self.media,
        ) {
            Ok(logits) => Some(logits),
            Err(e) => {
                eprintln!("warning: {e}; decode steps run kernel by kernel from now on");
                self.graphs = None;
                None
            }
        }
    }

    /// The next token of each request in `sampled`, from its row of `logits`, all in one backend call. When that
    /// call fails (a row with nothing to sample), each row is sampled alone with the same draw, so only the rows at
    /// fault fail.
    fn sample(&mut self, logits: &B::Tensor, sampled: &[RequestId]) -> Vec<Result<Sampled>> {
        let uniforms: Vec<f32> = sampled
            .iter()
            .map(|id| self.requests.get_mut(id).expect("known").sampler.draw())
            .collect();
        let rules: Vec<RowSampling> = sampled
            .iter()
            .zip(uniforms)
            .map(|(id, u)| self.requests[id].sampler.rule(u))
            .collect();
        let b = &self.pipeline.backend;
        match b.sample(logits, &rules) {
            Ok(tokens) => tokens.into_iter().map(Ok).collect(),
            Err(_) => (0..rules.len())
                .map(|i| {
                    let row = b.gather_rows(logits, &[i]);
                    b.sample(&row, &rules[i..=i]).map(|mut t| t.remove(0))
                })
                .collect(),
        }
    }

    /// Drops a request that failed on its own, freeing what it holds, and reports it.
    fn fail(&mut self, id: RequestId, message: String, events: &mut Vec<Event>) {
        self.scheduler.finish(id);
        // A shared prefix that fails fails the requests waiting for it.
        let forks = self.requests.remove(&id).and_then(|r| r.forks).unwrap_or_default();
        for f in forks {
            self.fork_parent.remove(&f.id);
            events.push(Event::Failed { id: f.id, message: message.clone() });
        }
        events.push(Event::Failed { id, message });
    }

    /// Reports a finished request's output (its blocks and media slots are already free).
    fn report_finished(
        &mut self,
        seq: &SeqState,
        reason: FinishReason,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let mut request = self
            .requests
            .remove(&seq.id)
            .expect("finished requests are known");
        let generated = match request.scores_only {
            true => &[][..],
            false => seq.generated(),
        };
        let text = self.pipeline.tokenizer.decode(generated, true)?;
        let id = seq.id;
        let text = request.stream.finish(&text, &mut |delta: &str| {
            events.push(Event::Text {
                id,
                delta: delta.to_string(),
            })
        });
        let prompt_logprobs = request
            .prompt_logprobs
            .map(|lp| lp.at.into_iter().flatten().collect())
            .unwrap_or_default();
        events.push(Event::Finished {
            id,
            output: GenerationOutput {
                generated_ids: generated.to_vec(),
                prompt_ids: seq.tokens[..seq.prompt_len].to_vec(),
                text,
                finish_reason: reason,
                logprobs: request.logprobs,
                prompt_logprobs,
            },
        });
        Ok(())
    }
}

/// The content key of each image (after the one before it where they are seen together).
fn image_keys(pixels: &[PreparedImage], joins_previous: &[bool]) -> Vec<ContentKey> {
    let mut keys: Vec<ContentKey> = Vec::with_capacity(pixels.len());
    for (image, &joins) in pixels.iter().zip(joins_previous) {
        let after = keys.last().filter(|_| joins);
        keys.push(image_key(&image.pixels, image.tiles, after));
    }
    keys
}

/// Positions of `prompt` that may come from the prefix cache: all of it, except the rows whose logits give the
/// prompt log-probabilities the request reports (from token `scored_from` on).
fn reusable_positions(prompt: &EncodedPrompt, request: &GenerationRequest, scored_from: usize) -> usize {
    match request.prompt_logprobs {
        Some(_) => scored_from.max(1) - 1,
        None => prompt.ids.len(),
    }
}

/// Streams the text of `seq`, which has just sampled `next`, and says whether it is finished.
fn accept(
    tokenizer: &Tokenizer,
    seq: &SeqState,
    request: &mut Request,
    next: u32,
    events: &mut Vec<Event>,
) -> Result<Option<FinishReason>> {
    if request.stop_ids.contains(&next) {
        return Ok(Some(FinishReason::Stop));
    }
    let text = tokenizer.decode(seq.generated(), true)?;
    let id = seq.id;
    let mut emit = |delta: &str| {
        events.push(Event::Text {
            id,
            delta: delta.to_string(),
        })
    };
    if request.stream.update(&text, &mut emit) {
        return Ok(Some(FinishReason::Stop));
    }
    Ok(seq.is_full().then_some(FinishReason::Length))
}
