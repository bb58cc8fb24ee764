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
use crate::runtime::request::{GenerationOutput, GenerationRequest};
use crate::runtime::scheduler::RequestId;

/// What a submitted request receives.
#[derive(Debug)]
pub enum StreamEvent {
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
    /// Per bucket of `STEP_BUCKETS` (plus one for +Inf): steps that took at most that long; and their sum.
    pub step_counts: Mutex<([u64; STEP_BUCKETS.len() + 1], f64)>,
}

impl ServiceMetrics {
    fn observe_step(&self, seconds: f64) {
        let mut h = self.step_counts.lock().expect("metrics lock");
        let bucket = STEP_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(STEP_BUCKETS.len());
        h.0[bucket] += 1;
        h.1 += seconds;
    }
}

struct Submission {
    prompt: EncodedPrompt,
    pixels: Vec<PreparedImage>,
    request: GenerationRequest,
    events: UnboundedSender<StreamEvent>,
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
        let (events, rx) = unbounded_channel();
        let inbox = self.inbox.as_ref().expect("inbox lives until shutdown");
        self.metrics.in_flight.fetch_add(1, Ordering::SeqCst);
        inbox
            .send(Submission {
                prompt,
                pixels,
                request,
                events,
            })
            .map_err(|_| {
                self.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
                Error::Invalid("the engine thread has stopped".into())
            })?;
        Ok(rx)
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
    let mut listeners: HashMap<RequestId, UnboundedSender<StreamEvent>> = HashMap::new();
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
        metrics.observe_step(start.elapsed().as_secs_f64());
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
    listeners: &mut HashMap<RequestId, UnboundedSender<StreamEvent>>,
    metrics: &ServiceMetrics,
) {
    match engine.add_request(s.prompt, s.pixels, &s.request) {
        Ok(id) => {
            listeners.insert(id, s.events);
        }
        Err(e) => {
            let _ = s.events.send(StreamEvent::Refused(e.to_string()));
            metrics.requests_failed.fetch_add(1, Ordering::SeqCst);
            metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn cancel_abandoned<B: Backend>(
    engine: &mut Engine<'_, B>,
    listeners: &mut HashMap<RequestId, UnboundedSender<StreamEvent>>,
    metrics: &ServiceMetrics,
) {
    listeners.retain(|&id, tx| {
        if !tx.is_closed() {
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
    listeners: &mut HashMap<RequestId, UnboundedSender<StreamEvent>>,
    metrics: &ServiceMetrics,
) {
    for event in events {
        match event {
            Event::Text { id, delta } => {
                if let Some(tx) = listeners.get(&id) {
                    let _ = tx.send(StreamEvent::Text(delta));
                }
            }
            Event::Finished { id, output } => {
                metrics
                    .prompt_tokens
                    .fetch_add(output.prompt_ids.len() as u64, Ordering::SeqCst);
                metrics
                    .generated_tokens
                    .fetch_add(output.generated_ids.len() as u64, Ordering::SeqCst);
                metrics.requests_finished.fetch_add(1, Ordering::SeqCst);
                metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
                if let Some(tx) = listeners.remove(&id) {
                    let _ = tx.send(StreamEvent::Done(output));
                }
            }
            Event::Failed { id, message } => {
                metrics.requests_failed.fetch_add(1, Ordering::SeqCst);
                metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
                if let Some(tx) = listeners.remove(&id) {
                    let _ = tx.send(StreamEvent::Failed(Error::Engine(message).to_string()));
                }
            }
        }
    }
}

/// A failed step (a backend error) fails every request in it: report and drop them all rather than retry forever.
fn fail_all<B: Backend>(
    engine: &mut Engine<'_, B>,
    listeners: &mut HashMap<RequestId, UnboundedSender<StreamEvent>>,
    metrics: &ServiceMetrics,
    message: &str,
) {
    for (id, tx) in listeners.drain() {
        engine.cancel(id);
        let _ = tx.send(StreamEvent::Failed(
            Error::Engine(message.to_string()).to_string(),
        ));
        metrics.requests_failed.fetch_add(1, Ordering::SeqCst);
        metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
