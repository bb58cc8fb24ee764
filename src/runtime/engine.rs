//! The continuous-batching engine: many requests share every decoder step.
//!
//! Each call to [`Engine::step`]:
//! 1. admits waiting requests first come, first served, while the KV pool can hold their tokens, the media cache
//!    their images, and the batch has room; the images of all requests admitted together go through the vision
//!    encoder and resampler, and every cross-attention block's K/V is computed once for all of them into the
//!    media cache, where it stays for the request's life;
//! 2. plans the step under a token budget: every running sequence that is decoding contributes its one new token,
//!    then prompts contribute chunks (chunked prefill) in arrival order;
//! 3. grows block tables; when the pool runs dry the newest running sequence is preempted: its blocks are freed and
//!    it goes back to the queue, to be recomputed from its prompt and the tokens it has generated (overload slows
//!    requests down and never fails or loses one);
//! 4. runs one forward pass over all planned rows and samples every finished row on the backend in one call, each
//!    with its request's own rule and generator (so a seeded request gives the same tokens whatever else shares
//!    the batch), and reports text and completions. A step of decodes only (one row per sequence, at most
//!    [`MAX_RECORDED_SEQS`]) runs through the backend's recorded steps where it has them (CUDA graphs): padded to
//!    the next power of two with rows on the KV cache's padding block, recorded the first time, replayed after.
//!
//! A request's output does not depend on what it is batched with: every op computes a row the same way whatever
//! rows share its launch (tested in `tests/batch_invariance.rs`).

use std::collections::VecDeque;

use crate::backend::{Backend, DecodeShape, RowSampling, SeqStep, StepLayout};
use crate::cache::kv_cache::PagedKvCache;
use crate::cache::media_cache::MediaCache;
use crate::error::{Error, Result};
use crate::io::prompt::EncodedPrompt;
use crate::model::sampling::Sampler;
use crate::runtime::pipeline::Pipeline;
use crate::runtime::request::{FinishReason, GenerationOutput, GenerationRequest};
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
}

/// Decode steps of up to this many sequences are recorded. Padding to the next power of two never crosses the CUDA
/// backend's regime boundary ([`GEMV_MAX_ROWS`](crate::backend::cuda::GEMV_MAX_ROWS) = 64: GEMV up to it, GEMM
/// above, and both GEMM kernels give bit-identical rows), so a padded step computes each real row exactly as an
/// eager step of its own size does.
pub const MAX_RECORDED_SEQS: usize = 256;

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
        }
    }
}

pub type RequestId = u64;

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
}

/// What the engine reports after a step.
#[derive(Clone, Debug)]
pub enum Event {
    /// More of a request's text (never part of a stop string).
    Text { id: RequestId, delta: String },
    /// A request is complete; its blocks and media slots are already free.
    Finished {
        id: RequestId,
        output: GenerationOutput,
    },
}

/// A request the engine is working on.
struct Sequence {
    id: RequestId,
    prompt_len: usize,
    /// Prompt and generated tokens; all but the last generated one are fed to the model.
    tokens: Vec<u32>,
    /// Per token: the request's image it attends to (-1: none).
    image_of_token: Vec<i32>,
    /// Positions whose K/V are in the cache.
    computed: usize,
    block_table: Vec<u32>,
    /// Media-cache slot of each of the request's images, taken at first admission and kept until the end.
    media_slots: Vec<u32>,
    num_images: usize,
    /// Preprocessed images, until they are encoded.
    pixels: Vec<Vec<f32>>,
    max_new_tokens: usize,
    /// Positions the sequence may use: prompt + new tokens, within the model's context.
    capacity: usize,
    sampler: Sampler,
    stream: TextStream,
    stop_ids: Vec<u32>,
}

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens still to run through the model before the next one can be sampled.
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    fn has_media(&self) -> bool {
        self.pixels.is_empty()
    }
}

/// One step's rows as the model takes them.
struct StepInputs {
    /// Token ids of every row, sequence after sequence.
    ids: Vec<u32>,
    seqs: Vec<SeqStep>,
    /// Rows whose logits are sampled (each sequence's last row once its pending tokens are all computed).
    sample_rows: Vec<usize>,
    /// The index into `running` of each sampled row's sequence.
    sampled: Vec<usize>,
}

/// The engine over one loaded model; see the module doc for what a step does.
pub struct Engine<'p, B: Backend> {
    pipeline: &'p Pipeline<B>,
    config: EngineConfig,
    kv: PagedKvCache<B>,
    media: MediaCache<B>,
    /// Requests not running, in arrival order (preempted ones go back in their arrival place).
    waiting: VecDeque<Sequence>,
    /// Running requests, in arrival order.
    running: Vec<Sequence>,
    next_id: RequestId,
    preemptions: usize,
    /// The backend's recorded decode steps, when it has them and the config asks for them.
    graphs: Option<B::StepGraphs>,
    recorded_steps: usize,
}

impl<'p, B: Backend> Engine<'p, B> {
    pub fn new(pipeline: &'p Pipeline<B>, config: EngineConfig) -> Result<Self> {
        if config.block_size == 0
            || config.kv_blocks == 0
            || config.max_seqs == 0
            || config.max_step_tokens == 0
        {
            return Err(Error::Invalid(format!(
                "engine limits must be positive: {config:?}"
            )));
        }
        let b = &pipeline.backend;
        let graphs = config
            .decode_graphs
            .then(|| b.new_step_graphs(pipeline.model.config.head_dim()))
            .flatten();
        Ok(Engine {
            graphs,
            recorded_steps: 0,
            kv: pipeline
                .model
                .new_kv_cache(b, config.kv_blocks, config.block_size),
            media: pipeline.model.new_media_cache(b, config.media_slots),
            pipeline,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            preemptions: 0,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Requests accepted and not finished.
    pub fn pending_requests(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    pub fn running_requests(&self) -> usize {
        self.running.len()
    }

    pub fn free_kv_blocks(&self) -> usize {
        self.kv.free_blocks()
    }

    /// Times a sequence was preempted to make room.
    pub fn preemptions(&self) -> usize {
        self.preemptions
    }

    /// Queue, batch and cache occupancy now.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            waiting: self.waiting.len(),
            running: self.running.len(),
            kv_blocks_total: self.kv.total_blocks(),
            kv_blocks_used: self.kv.total_blocks() - self.kv.free_blocks(),
            media_slots_used: self.media.total_slots() - self.media.free_slots(),
            preemptions: self.preemptions,
            recorded_steps: self.recorded_steps,
        }
    }

    /// Drops a request wherever it is (queued or running) and frees what it holds; false if it is unknown or
    /// already finished. No event is reported for it afterwards.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i).expect("index in range")
        } else {
            return false;
        };
        self.release(seq);
        true
    }

    fn release(&mut self, mut seq: Sequence) -> Sequence {
        self.kv.release(&mut seq.block_table);
        self.media.release(&mut seq.media_slots);
        seq
    }

    /// Queues a request; refuses one the engine could never run (prompt over the context, more images than the
    /// media cache holds, a prompt longer than the whole KV pool, invalid sampling parameters).
    pub fn add_request(
        &mut self,
        prompt: EncodedPrompt,
        pixels: Vec<Vec<f32>>,
        request: &GenerationRequest,
    ) -> Result<RequestId> {
        let p = self.pipeline;
        p.check_prompt(&prompt)?;
        request.sampling.validate().map_err(Error::Invalid)?;
        if prompt.ids.is_empty() {
            return Err(Error::Prompt("the prompt has no tokens".into()));
        }
        if pixels.len() != prompt.num_images {
            return Err(Error::Prompt(format!(
                "the prompt has {} <image> markers but {} images were given",
                prompt.num_images,
                pixels.len()
            )));
        }
        if pixels.len() > self.media.total_slots() {
            return Err(Error::Invalid(format!(
                "{} images, more than the media cache holds ({})",
                pixels.len(),
                self.media.total_slots()
            )));
        }
        let capacity =
            (prompt.ids.len() + request.max_new_tokens).min(p.model.config.max_position_embeddings);
        if self.kv.blocks_for(capacity) > self.kv.total_blocks() {
            return Err(Error::Invalid(format!(
                "a request of {capacity} positions needs {} KV blocks, more than the pool's {}",
                self.kv.blocks_for(capacity),
                self.kv.total_blocks()
            )));
        }
        let tok = &p.tokenizer;
        let sampler = Sampler::new(
            request.sampling.clone(),
            vec![tok.image_id, tok.fake_image_id],
            &prompt.ids,
        );
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Sequence {
            id,
            prompt_len: prompt.ids.len(),
            tokens: prompt.ids,
            image_of_token: prompt.image_of_token,
            computed: 0,
            block_table: Vec::new(),
            media_slots: Vec::new(),
            num_images: pixels.len(),
            pixels,
            max_new_tokens: request.max_new_tokens,
            capacity,
            sampler,
            stream: TextStream::new(request.stop.clone()),
            stop_ids: match request.ignore_eos {
                true => Vec::new(),
                false => std::iter::once(tok.eos_id)
                    .chain(tok.end_of_utterance_id)
                    .collect(),
            },
        });
        Ok(id)
    }

    /// Runs one step (see the module doc) and returns what happened; does nothing when no request is pending.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        self.finish_empty_requests(&mut events)?;
        self.admit()?;
        let plan = self.plan();
        if plan.is_empty() {
            return Ok(events);
        }
        self.run(plan, &mut events)?;
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

    /// Requests asking for no new tokens finish without touching the model.
    fn finish_empty_requests(&mut self, events: &mut Vec<Event>) -> Result<()> {
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].max_new_tokens == 0 {
                let seq = self.waiting.remove(i).expect("index in range");
                self.finish(seq, FinishReason::Length, events)?;
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Moves waiting requests to running, first come first served, while there is room for all their tokens;
    /// encodes the images of those admitted for the first time, all together.
    fn admit(&mut self) -> Result<()> {
        let mut fresh = Vec::new();
        let mut media_taken = 0;
        while self.running.len() < self.config.max_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            let media_needed = if seq.has_media() { 0 } else { seq.num_images };
            let media_short = self.media.free_slots() < media_taken + media_needed;
            if media_short || !self.kv.grow(&mut seq.block_table, seq.tokens.len()) {
                break;
            }
            media_taken += media_needed;
            let seq = self.waiting.pop_front().expect("front exists");
            if !seq.has_media() {
                fresh.push(self.running.len());
            }
            self.running.push(seq);
        }
        if !fresh.is_empty() {
            self.encode_media(&fresh);
        }
        Ok(())
    }

    /// Vision encoder, resampler and cross-attention K/V of the images of `running[i]` for each `i` given: one
    /// K/V projection per block for all of them, into freshly taken media slots.
    fn encode_media(&mut self, indices: &[usize]) {
        let (p, b) = (self.pipeline, &self.pipeline.backend);
        let mut images = Vec::new();
        for &i in indices {
            images.append(&mut self.running[i].pixels);
        }
        if images.is_empty() {
            return;
        }
        let states = p.model.encode_images(b, &images);
        let kv = p.model.cross_kv(b, &states);
        let mut slots = self
            .media
            .insert(b, &kv, images.len())
            .expect("admission checked the free media slots")
            .into_iter();
        for &i in indices {
            let seq = &mut self.running[i];
            seq.media_slots = slots.by_ref().take(seq.num_images).collect();
        }
    }

    /// Chooses each running sequence's rows for this step: decodes first (one row each), then prompt chunks in
    /// arrival order, within the token budget; grows block tables, preempting the newest sequences when the
    /// pool is dry. Returns `(index into running, rows)` in running order.
    fn plan(&mut self) -> Vec<(usize, usize)> {
        let mut budget = self.config.max_step_tokens;
        let mut rows = vec![0usize; self.running.len()];
        for (i, seq) in self.running.iter().enumerate() {
            if seq.pending() == 1 && budget > 0 {
                rows[i] = 1;
                budget -= 1;
            }
        }
        for (i, seq) in self.running.iter().enumerate() {
            if seq.pending() > 1 && budget > 0 {
                rows[i] = seq.pending().min(budget);
                budget -= rows[i];
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if rows[i] > 0 {
                let needed = self.running[i].computed + rows[i];
                while !self.kv.grow(&mut self.running[i].block_table, needed) {
                    let victim = self.running.len() - 1;
                    self.preempt(victim);
                    rows.truncate(victim);
                    if victim == i {
                        break;
                    }
                }
            }
            i += 1;
        }
        rows.into_iter()
            .enumerate()
            .filter(|&(_, r)| r > 0)
            .collect()
    }

    /// Frees `running[i]`'s blocks and queues it again in its arrival place, to be recomputed.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        self.kv.release(&mut seq.block_table);
        seq.computed = 0;
        let at = self
            .waiting
            .iter()
            .position(|w| w.id > seq.id)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
        self.preemptions += 1;
    }

    /// Runs the planned rows through the model and samples the sequences whose pending tokens are all computed.
    fn run(&mut self, plan: Vec<(usize, usize)>, events: &mut Vec<Event>) -> Result<()> {
        let p = self.pipeline;
        let inputs = self.step_inputs(&plan);
        let logits = self.step_logits(&inputs)?;
        for &(i, rows) in &plan {
            self.running[i].computed += rows;
        }
        let Some(logits) = logits else {
            return Ok(());
        };
        let next = self.sample(&logits, &inputs.sampled)?;
        let mut done = Vec::new();
        for (&i, &token) in inputs.sampled.iter().zip(&next) {
            if let Some(reason) = Self::accept(p, &mut self.running[i], token, events)? {
                done.push((i, reason));
            }
        }
        for &(i, reason) in done.iter().rev() {
            let seq = self.running.remove(i);
            self.finish(seq, reason, events)?;
        }
        Ok(())
    }

    /// The planned rows as the model takes them.
    fn step_inputs(&self, plan: &[(usize, usize)]) -> StepInputs {
        let mut inputs = StepInputs {
            ids: Vec::new(),
            seqs: Vec::with_capacity(plan.len()),
            sample_rows: Vec::new(),
            sampled: Vec::new(),
        };
        for &(i, rows) in plan {
            let seq = &self.running[i];
            let range = seq.computed..seq.computed + rows;
            inputs.ids.extend_from_slice(&seq.tokens[range.clone()]);
            let slot_of = |img: i32| match usize::try_from(img) {
                Ok(j) => seq.media_slots[j] as i32,
                Err(_) => -1,
            };
            inputs.seqs.push(SeqStep {
                q_rows: rows,
                kv_len: range.end,
                block_table: seq.block_table.clone(),
                image_of_row: seq.image_of_token[range.clone()]
                    .iter()
                    .map(|&img| slot_of(img))
                    .collect(),
            });
            if range.end == seq.tokens.len() {
                inputs.sample_rows.push(inputs.ids.len() - 1);
                inputs.sampled.push(i);
            }
        }
        inputs
    }

    /// The logits of the step's sampled rows (none when it only prefills): from the recording for its batch size
    /// when every row is a decode and the backend records, else launched op by op.
    fn step_logits(&mut self, inputs: &StepInputs) -> Result<Option<B::Tensor>> {
        let decode_only =
            inputs.sample_rows.len() == inputs.ids.len() && inputs.ids.len() <= MAX_RECORDED_SEQS;
        if decode_only {
            if let Some(logits) = self.recorded_logits(inputs) {
                self.recorded_steps += 1;
                return Ok(Some(logits));
            }
        }
        let (p, b) = (self.pipeline, &self.pipeline.backend);
        let step = StepLayout {
            block_size: self.config.block_size,
            seqs: inputs.seqs.clone(),
        };
        let layout = b.layout(&step);
        let h = p
            .model
            .forward(b, &inputs.ids, &layout, &mut self.kv, &self.media, None)?;
        Ok((!inputs.sample_rows.is_empty())
            .then(|| p.model.logits(b, &b.gather_rows(&h, &inputs.sample_rows))))
    }

    /// A decode step through the backend's recordings, `None` where it has none. Recording is an optimisation: a
    /// failure to record or replay turns recordings off and the step runs op by op, never failing a request.
    fn recorded_logits(&mut self, inputs: &StepInputs) -> Option<B::Tensor> {
        let graphs = self.graphs.as_mut()?;
        let padded = padded(
            inputs.ids.clone(),
            inputs.seqs.clone(),
            self.config.block_size,
            self.kv.padding_block(),
        );
        match recorded_logits(self.pipeline, graphs, padded, &mut self.kv, &self.media) {
            Ok(logits) => Some(logits),
            Err(e) => {
                eprintln!("warning: {e}; decode steps run kernel by kernel from now on");
                self.graphs = None;
                None
            }
        }
    }

    /// The next token of each of `running[i]` for `i` in `sampled`, from its row of `logits`, all in one backend
    /// call.
    fn sample(&mut self, logits: &B::Tensor, sampled: &[usize]) -> Result<Vec<u32>> {
        let uniforms: Vec<f32> = sampled
            .iter()
            .map(|&i| self.running[i].sampler.draw())
            .collect();
        let rules: Vec<RowSampling> = sampled
            .iter()
            .zip(uniforms)
            .map(|(&i, u)| self.running[i].sampler.rule(u))
            .collect();
        self.pipeline.backend.sample(logits, &rules)
    }

    /// Appends `next` to `seq`, streams its text, and says whether it is finished.
    fn accept(
        p: &Pipeline<B>,
        seq: &mut Sequence,
        next: u32,
        events: &mut Vec<Event>,
    ) -> Result<Option<FinishReason>> {
        let image = *seq.image_of_token.last().expect("prompts are not empty");
        seq.tokens.push(next);
        seq.image_of_token.push(image);
        seq.sampler.observe(next);
        if seq.stop_ids.contains(&next) {
            return Ok(Some(FinishReason::Stop));
        }
        let text = p.tokenizer.decode(seq.generated(), true)?;
        let id = seq.id;
        let mut emit = |delta: &str| {
            events.push(Event::Text {
                id,
                delta: delta.to_string(),
            })
        };
        if seq.stream.update(&text, &mut emit) {
            return Ok(Some(FinishReason::Stop));
        }
        let full = seq.generated().len() >= seq.max_new_tokens || seq.tokens.len() > seq.capacity;
        Ok(full.then_some(FinishReason::Length))
    }

    /// Frees a sequence's blocks and media slots and reports its output.
    fn finish(
        &mut self,
        seq: Sequence,
        reason: FinishReason,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let mut seq = self.release(seq);
        let text = self.pipeline.tokenizer.decode(seq.generated(), true)?;
        let id = seq.id;
        let text = seq.stream.finish(&text, &mut |delta: &str| {
            events.push(Event::Text {
                id,
                delta: delta.to_string(),
            })
        });
        events.push(Event::Finished {
            id,
            output: GenerationOutput {
                generated_ids: seq.generated().to_vec(),
                prompt_ids: seq.tokens[..seq.prompt_len].to_vec(),
                text,
                finish_reason: reason,
            },
        });
        Ok(())
    }
}

/// A decode step of these rows padded to the next power of two with one-row sequences on the padding block `pad`,
/// so that every step of a batch size replays one recording. Returns the ids, the step and how many rows are real.
fn padded(
    mut ids: Vec<u32>,
    mut seqs: Vec<SeqStep>,
    block_size: usize,
    pad: u32,
) -> (Vec<u32>, StepLayout, usize) {
    let real = seqs.len();
    for _ in seqs.len()..seqs.len().next_power_of_two() {
        ids.push(0);
        seqs.push(SeqStep {
            q_rows: 1,
            kv_len: 1,
            block_table: vec![pad],
            image_of_row: vec![-1],
        });
    }
    (ids, StepLayout { block_size, seqs }, real)
}

/// The logits of every real row of a padded decode step, through the backend's recording for its batch size (made
/// on the first such step). Block tables and attention splits take the shape of the longest sequence possible.
fn recorded_logits<B: Backend>(
    p: &Pipeline<B>,
    graphs: &mut B::StepGraphs,
    (ids, step, real): (Vec<u32>, StepLayout, usize),
    kv: &mut PagedKvCache<B>,
    media: &MediaCache<B>,
) -> Result<B::Tensor> {
    let b = &p.backend;
    // No sequence outgrows the model's context or the whole pool.
    let max_kv = p
        .model
        .config
        .max_position_embeddings
        .min(kv.total_blocks() * kv.block_size());
    let shape = DecodeShape {
        table_width: kv.blocks_for(max_kv),
        max_kv,
    };
    b.run_recorded(graphs, &ids, &step, shape, real, &mut |layout| {
        let h = p.model.forward(b, &ids, layout, kv, media, None)?;
        Ok(p.model.logits(b, &h))
    })
}
