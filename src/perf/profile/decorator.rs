//! A backend wrapper that times every op: [`Profiled`] implements [`Backend`] by delegating to the backend it wraps,
//! taking a timestamp on the backend's own clock before and after each op (`Backend::timestamp`: CUDA events on a
//! GPU, the host clock on the CPU) without waiting for the device, and recording what the op had to do (FLOPs,
//! bytes moved: `work`) from its operand shapes. The device is synchronised only at the ends of each phase span
//! (one engine step), where the span's op times are read: on a GPU the ops run back to back as they do
//! unprofiled, and an op's time is the device's time for it, not a launch-and-wait.
//!
//! The `impl Backend` is generated from the trait (`build/profiled.rs`); written here are the timing, the ops that
//! wrap what they return (`*_profiled`), and the records' table and trace (through `report`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::backend::{Backend, Ceilings, DecodeShape, RowSampling, Sampled, StepLayout};
use crate::error::Result;
use crate::io::config::{Activation, Alibi, RopeFrequencies};
use crate::io::safetensors::{DType, TensorRef};
use crate::perf::profile::report::{self, OpRow, Record, Span};
use crate::perf::profile::work::{self, Cost, ProfiledLayout, ProfiledWeight};

/// A recorded step runs eagerly here, so that each of its ops is timed on its own (and an engine's padded decode
/// steps can be checked on any backend).
pub type ProfiledStepGraphs = ();

/// An op whose timestamps are not read yet.
struct Pending<T> {
    op: String,
    start: T,
    end: T,
    cost: Cost,
}

/// The span running now: where it starts on both clocks, and its ops so far.
struct Open<T> {
    name: String,
    pass: usize,
    start_us: f64,
    origin: T,
    ops: Vec<Pending<T>>,
}

pub struct Profiled<B: Backend> {
    inner: B,
    epoch: Instant,
    records: Mutex<Vec<Record>>,
    spans: Mutex<Vec<Span>>,
    open: Mutex<Option<Open<B::Timestamp>>>,
    /// The measured pass of the workload running now (`next_pass`).
    pass: AtomicUsize,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Profiled {
            inner,
            epoch: Instant::now(),
            records: Mutex::new(Vec::new()),
            spans: Mutex::new(Vec::new()),
            open: Mutex::new(None),
            pass: AtomicUsize::new(0),
        }
    }

    /// Ops from now on belong to the next pass of the workload: a table keeps each op's fastest pass.
    pub fn next_pass(&self) {
        self.pass.fetch_add(1, Ordering::Relaxed);
    }

    /// The backend being profiled.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn now_us(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64() * 1e6
    }

    /// Runs `f` as one span of phase `name`: its ops are labelled with it, and its wall time (from a synchronised
    /// start to a synchronised end) is the base of their shares. Spans do not nest.
    pub fn phase<T>(&self, name: &str, f: impl FnOnce() -> T) -> T {
        self.inner.synchronize();
        let start_us = self.now_us();
        // The device is idle here, so this stamp is reached at once: it ties the device's clock to `start_us`.
        let origin = self.inner.timestamp();
        let previous = self.open.lock().expect("open span lock").replace(Open {
            name: name.to_string(),
            pass: self.pass.load(Ordering::Relaxed),
            start_us,
            origin,
            ops: Vec::new(),
        });
        assert!(previous.is_none(), "profiled phase {name} inside another");
        let out = f();
        self.inner.synchronize();
        let end_us = self.now_us();
        let open = self.open.lock().expect("open span lock").take();
        self.close(open.expect("opened above"), end_us);
        out
    }

    /// Reads the times of a finished span's ops (all reached: the device was synchronised) and records them with
    /// the span. Their stamps are dropped here, so a GPU's events are reused by the next span.
    fn close(&self, span: Open<B::Timestamp>, end_us: f64) {
        let records = span.ops.into_iter().map(|p| Record {
            start_us: span.start_us + self.inner.elapsed_us(&span.origin, &p.start),
            duration_us: self.inner.elapsed_us(&p.start, &p.end),
            op: p.op,
            phase: span.name.clone(),
            pass: span.pass,
            flops: p.cost.flops,
            bytes: p.cost.bytes,
        });
        self.records.lock().expect("records lock").extend(records);
        self.spans.lock().expect("spans lock").push(Span {
            name: span.name,
            pass: span.pass,
            start_us: span.start_us,
            end_us,
        });
    }

    /// Times one op between two stamps on the backend's clock, and records the work it did. An op outside any
    /// phase (model loading, engine set-up) is a span of phase "other" on its own, so nothing waits unread.
    fn timed<T>(&self, op: &str, cost: Cost, f: impl FnOnce() -> T) -> T {
        if self.open.lock().expect("open span lock").is_none() {
            return self.phase("other", || self.timed(op, cost, f));
        }
        let start = self.inner.timestamp();
        let out = f();
        let end = self.inner.timestamp();
        let op = match &cost.detail {
            Some(detail) => format!("{op} {detail}"),
            None => op.to_string(),
        };
        let mut open = self.open.lock().expect("open span lock");
        open.as_mut().expect("checked above").ops.push(Pending {
            op,
            start,
            end,
            cost,
        });
        out
    }

    pub fn records(&self) -> Vec<Record> {
        self.records.lock().expect("records lock").clone()
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("spans lock").clone()
    }

    /// Per-op table of one phase (see [`report::table`]).
    pub fn table(&self, phase: &str, ceilings: &Ceilings) -> Vec<OpRow> {
        report::table(&self.records(), &self.spans(), phase, ceilings)
    }

    /// Wall time of a phase, microseconds (all its spans).
    pub fn phase_us(&self, phase: &str) -> f64 {
        report::phase_us(&self.spans(), phase)
    }

    /// Every phase and op as a Chrome trace.
    pub fn chrome_trace(&self) -> serde_json::Value {
        report::chrome_trace(&self.records(), &self.spans())
    }

    fn load_weight_profiled(&self, t: &TensorRef) -> Result<ProfiledWeight<B::Weight>> {
        let (rows, cols) = match t.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [r, rest @ ..] => (*r, rest.iter().product()),
        };
        Ok(ProfiledWeight {
            inner: self.inner.load_weight(t)?,
            rows,
            cols,
            bytes: rows * cols * self.inner.weight_width(t.dtype),
        })
    }

    fn layout_profiled(&self, step: &StepLayout) -> ProfiledLayout<B::Layout> {
        let inner = self.timed("layout", Cost::default(), || self.inner.layout(step));
        ProfiledLayout {
            inner,
            step: step.clone(),
        }
    }

    fn new_step_graphs_profiled(&self, _head_dim: usize) -> Option<ProfiledStepGraphs> {
        Some(())
    }

    /// The step runs eagerly (see [`ProfiledStepGraphs`]).
    fn run_recorded_profiled(
        &self,
        _graphs: &mut ProfiledStepGraphs,
        _ids: &[u32],
        step: &StepLayout,
        _shape: DecodeShape,
        rows: usize,
        run: &mut dyn FnMut(&ProfiledLayout<B::Layout>) -> Result<B::Tensor>,
    ) -> Result<B::Tensor> {
        let out = run(&self.layout(step))?;
        Ok(self.slice_rows(&out, 0, rows))
    }
}

include!(concat!(env!("OUT_DIR"), "/profiled.rs"));
