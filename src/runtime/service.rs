//! The engine on its own thread, for callers that are not a loop (the HTTP server): submit a prepared request,
//! get a channel of its events. The thread steps the engine while any request is pending and sleeps on its inbox
//! otherwise. A request whose receiver is dropped (client gone) is cancelled at the next step, freeing its KV blocks
//! and media slots.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::io::image::PreparedImage;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::prompt::EncodedPrompt;
use crate::runtime::engine::{Engine, EngineConfig, EngineStats, Event};
use crate::runtime::pipeline::Pipeline;
use crate::backend::TokenLogprobs;
use crate::runtime::request::{GenerationOutput, GenerationRequest};
use crate::runtime::scheduler::RequestId;

/// What a submitted request receives.
#[derive(Debug)]
pub enum StreamEvent {
    /// A new token's log-probabilities (requests that asked for them), before the text it adds.
    Logprobs(TokenLogprobs),
    /// The prompt's log-probabilities (requests that asked for them), before any text.
    PromptLogprobs(Vec<TokenLogprobs>),
    Text(String),
    Done(GenerationOutput),
    /// The engine refused the request (a client fault: it could never run).
    Refused(String),
    /// The engine failed the request (an engine fault).
    Failed(String),
}

/// Upper bounds (seconds) of the step-latency histogram's buckets.
pub const STEP_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Upper bounds (seconds) of the per-request latency histograms' buckets (time to first token, end to end, queue).
pub const REQUEST_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Upper bounds of the tokens-per-request histogram's buckets.
pub const TOKEN_BUCKETS: [f64; 12] = [
    1.0, 4.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 16384.0,
];

/// A Prometheus histogram: per bucket (plus one for +Inf) the observations at most its bound, and their sum.
#[derive(Clone, Debug)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
    }
}

/// The service's histograms.
#[derive(Clone, Debug)]
pub struct Histograms {
    /// Engine step latency.
    pub step_seconds: Histogram,
    /// Submission to first new token.
    pub time_to_first_token_seconds: Histogram,
    /// Submission to completion.
    pub e2e_request_latency_seconds: Histogram,
    /// Submission to the first step that runs the request.
    pub queue_time_seconds: Histogram,
    /// Prompt tokens and generated tokens of finished requests.
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
}

impl Default for Histograms {
    fn default() -> Self {
        Histograms {
            step_seconds: Histogram::new(&STEP_BUCKETS),
            time_to_first_token_seconds: Histogram::new(&REQUEST_BUCKETS),
            e2e_request_latency_seconds: Histogram::new(&REQUEST_BUCKETS),
            queue_time_seconds: Histogram::new(&REQUEST_BUCKETS),
            request_prompt_tokens: Histogram::new(&TOKEN_BUCKETS),
            request_generation_tokens: Histogram::new(&TOKEN_BUCKETS),
        }
    }
}

/// Counters the engine thread keeps up to date, read by `/metrics`.
#[derive(Default)]
pub struct ServiceMetrics {
    pub requests_finished: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Requests submitted and not yet finished, failed or cancelled.
    pub in_flight: AtomicUsize,
    pub stats: Mutex<EngineStats>,
    pub histograms: Mutex<Histograms>,
}

impl ServiceMetrics {
    fn observe(&self, pick: impl FnOnce(&mut Histograms) -> &mut Histogram, value: f64) {
        pick(&mut self.histograms.lock().expect("metrics lock")).observe(value);
    }
}

/// A submitted request's channel and timeline.
struct Listener {
    events: UnboundedSender<StreamEvent>,
    submitted: Instant,
    /// Whether its first token (or its prompt's scores) has been reported.
    answered: bool,
}

impl Listener {
    fn seconds(&self) -> f64 {
        self.submitted.elapsed().as_secs_f64()
    }

    /// Sends an event that answers the request, recording its time to first token the first time.
    fn answer(&mut self, event: StreamEvent, metrics: &ServiceMetrics) {
        if !self.answered {
            self.answered = true;
            metrics.observe(|h| &mut h.time_to_first_token_seconds, self.seconds());
        }
        let _ = self.events.send(event);
    }
}

struct Submission {
    submitted: Instant,
    prompt: EncodedPrompt,
    pixels: Vec<PreparedImage>,
    /// One request of `prompt`, or several choices of it ([`Engine::add_choices`]).
    requests: Vec<(GenerationRequest, UnboundedSender<StreamEvent>)>,
}

/// A handle to the engine thread; dropping it (or `shutdown`) lets the thread finish every accepted request and
/// exit.
pub struct EngineService<B: Backend + 'static> {
    pipeline: Arc<Pipeline<B>>,
    inbox: Option<mpsc::Sender<Submission>>,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<ServiceMetrics>,
}

impl<B: Backend + 'static> EngineService<B> {
    pub fn start(pipeline: Arc<Pipeline<B>>, config: EngineConfig) -> Result<Self> {
        // Fail here, not on the thread, if the limits are unusable.
        drop(Engine::new(&pipeline, config.clone())?);
        let (inbox, rx) = mpsc::channel();
        let metrics = Arc::new(ServiceMetrics::default());
        let thread = {
            let (pipeline, metrics) = (pipeline.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("flamingo-engine".into())
                .spawn(move || engine_loop(&pipeline, config, rx, &metrics))
                .map_err(|e| Error::Invalid(format!("cannot start the engine thread: {e}")))?
        };
        Ok(EngineService {
            pipeline,
            inbox: Some(inbox),
            thread: Some(thread),
            metrics,
        })
    }

    pub fn pipeline(&self) -> &Arc<Pipeline<B>> {
        &self.pipeline
    }

    pub fn metrics(&self) -> &Arc<ServiceMetrics> {
        &self.metrics
    }

    /// Queues a prepared request; its events arrive on the returned channel, ending with `Done` or `Error`.
    pub fn submit(
        &self,
        prompt: EncodedPrompt,
        pixels: Vec<PreparedImage>,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<StreamEvent>> {
        let mut rx = self.submit_choices(prompt, pixels, vec![request])?;
        Ok(rx.remove(0))
    }

    /// Queues several requests of one prepared prompt (a request's `n` choices, run as
    /// [`Engine::add_choices`] runs them). One channel per request, in order.
    pub fn submit_choices(
        &self,
        prompt: EncodedPrompt,
        pixels: Vec<PreparedImage>,
        requests: Vec<GenerationRequest>,
    ) -> Result<Vec<UnboundedReceiver<StreamEvent>>> {
        let (mut forks, mut receivers) = (Vec::new(), Vec::new());
        for request in requests {
            let (events, rx) = unbounded_channel();
            forks.push((request, events));
            receivers.push(rx);
        }
        let inbox = self.inbox.as_ref().expect("inbox lives until shutdown");
        let n = forks.len();
        self.metrics.in_flight.fetch_add(n, Ordering::SeqCst);
        inbox
            .send(Submission {
                submitted: Instant::now(),
                prompt,
                pixels,
                requests: forks,
            })
            .map_err(|_| {
                self.metrics.in_flight.fetch_sub(n, Ordering::SeqCst);
                Error::Invalid("the engine thread has stopped".into())
            })?;
        Ok(receivers)
    }

    /// Stops taking requests, lets the thread finish the accepted ones, and waits for it.
    pub fn shutdown(&mut self) {
        self.inbox.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<B: Backend + 'static> Drop for EngineService<B> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The engine thread: take submissions, step, route events, cancel requests nobody listens to any more.
fn engine_loop<B: Backend>(
    pipeline: &Pipeline<B>,
    config: EngineConfig,
    inbox: mpsc::Receiver<Submission>,
    metrics: &ServiceMetrics,
) {
    let mut engine = Engine::new(pipeline, config).expect("limits checked at start");
    let mut listeners: HashMap<RequestId, Listener> = HashMap::new();
    let mut open = true;
    loop {
        if engine.pending_requests() == 0 {
            if !open {
                return;
            }
            match inbox.recv() {
                Ok(s) => accept(&mut engine, s, &mut listeners, metrics),
                Err(_) => return,
            }
        }
        loop {
            match inbox.try_recv() {
                Ok(s) => accept(&mut engine, s, &mut listeners, metrics),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        cancel_abandoned(&mut engine, &mut listeners, metrics);
        let start = Instant::now();
        let events = engine.step();
        metrics.observe(|h| &mut h.step_seconds, start.elapsed().as_secs_f64());
        match events {
            Ok(events) => route(events, &mut listeners, metrics),
            Err(e) => fail_all(&mut engine, &mut listeners, metrics, &e.to_string()),
        }
        *metrics.stats.lock().expect("metrics lock") = engine.stats();
    }
}

fn accept<B: Backend>(
    engine: &mut Engine<'_, B>,
    s: Submission,
    listeners: &mut HashMap<RequestId, Listener>,
    metrics: &ServiceMetrics,
) {
    let (requests, senders): (Vec<GenerationRequest>, Vec<_>) = s.requests.into_iter().unzip();
    let added = engine.add_choices(s.prompt, s.pixels, requests);
    match added {
        Ok(ids) => {
            for (id, events) in ids.into_iter().zip(senders) {
                let listener = Listener {
                    events,
                    submitted: s.submitted,
                    answered: false,
                };
                listeners.insert(id, listener);
            }
        }
        Err(e) => {
            for events in senders {
                let _ = events.send(StreamEvent::Refused(e.to_string()));
                metrics.requests_failed.fetch_add(1, Ordering::SeqCst);
                metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

fn cancel_abandoned<B: Backend>(
    engine: &mut Engine<'_, B>,
    listeners: &mut HashMap<RequestId, Listener>,
    metrics: &ServiceMetrics,
) {
    listeners.retain(|&id, l| {
        if !l.events.is_closed() {
            return true;
        }
        engine.cancel(id);
        metrics.requests_cancelled.fetch_add(1, Ordering::SeqCst);
        metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
        false
    });
}

fn route(
    events: Vec<Event>,
    listeners: &mut HashMap<RequestId, Listener>,
    metrics: &ServiceMetrics,
) {
    for event in events {
        match event {
            Event::Started { id } => {
                if let Some(l) = listeners.get(&id) {
                    metrics.observe(|h| &mut h.queue_time_seconds, l.seconds());
                }
            }
            Event::Text { id, delta } => {
                if let Some(l) = listeners.get_mut(&id) {
                    l.answer(StreamEvent::Text(delta), metrics);
                }
            }
            Event::Logprobs { id, logprobs } => {
                if let Some(l) = listeners.get_mut(&id) {
                    l.answer(StreamEvent::Logprobs(logprobs), metrics);
                }
            }
            Event::PromptLogprobs { id, logprobs } => {
                if let Some(l) = listeners.get_mut(&id) {
                    l.answer(StreamEvent::PromptLogprobs(logprobs), metrics);
                }
            }
            Event::Finished { id, output } => {
                let (p, g) = (output.prompt_ids.len(), output.generated_ids.len());
                metrics.prompt_tokens.fetch_add(p as u64, Ordering::SeqCst);
                metrics.generated_tokens.fetch_add(g as u64, Ordering::SeqCst);
                metrics.requests_finished.fetch_add(1, Ordering::SeqCst);
                metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
                if let Some(mut l) = listeners.remove(&id) {
                    metrics.observe(|h| &mut h.request_prompt_tokens, p as f64);
                    metrics.observe(|h| &mut h.request_generation_tokens, g as f64);
                    metrics.observe(|h| &mut h.e2e_request_latency_seconds, l.seconds());
                    l.answer(StreamEvent::Done(output), metrics);
                }
            }
            Event::Failed { id, message } => {
                metrics.requests_failed.fetch_add(1, Ordering::SeqCst);
                metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
                if let Some(l) = listeners.remove(&id) {
                    let _ = l.events.send(StreamEvent::Failed(Error::Engine(message).to_string()));
                }
            }
        }
    }
}

/// A failed step (a backend error) fails every request in it: report and drop them all rather than retry forever.
fn fail_all<B: Backend>(
    engine: &mut Engine<'_, B>,
    listeners: &mut HashMap<RequestId, Listener>,
    metrics: &ServiceMetrics,
    message: &str,
) {
    for (id, l) in listeners.drain() {
        engine.cancel(id);
        let _ = l.events.send(StreamEvent::Failed(
            Error::Engine(message.to_string()).to_string(),
        ));
        metrics.requests_failed.fetch_add(1, Ordering::SeqCst);
        metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
