//! A backend wrapper that times every op: [`Profiled`] implements [`Backend`] by delegating to the backend it wraps,
//! taking a timestamp on the backend's own clock before and after each op (`Backend::timestamp`: CUDA events on a
//! GPU, the host clock on the CPU) without waiting for the device, and recording what the op had to do (FLOPs,
//! bytes moved) from its operand shapes. The device is synchronised only at the ends of each phase span (one
//! engine step), where the span's op times are read: on a GPU the ops run back to back as they do unprofiled, and
//! an op's time is the device's time for it, not a launch-and-wait.
//!
//! Records carry the phase they ran in (`prefill`, `decode`, set by the caller), and turn into a per-op table
//! ([`Profiled::table`]) and a Chrome trace ([`Profiled::chrome_trace`], opens in Perfetto or chrome://tracing).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;

use crate::backend::{Backend, Ceilings, DecodeShape, RowSampling, StepLayout};
use crate::error::Result;
use crate::io::config::Activation;
use crate::io::safetensors::{DType, TensorRef};
use crate::nvtx;
use crate::perf::bench::{bench_engine, bench_pixels, bench_prompt, bench_request};
use crate::runtime::pipeline::Pipeline;

/// One op as it ran.
#[derive(Clone, Debug)]
pub struct Record {
    /// The op, with the weight shape for linear layers (`linear 4096x11008`): one row of the table each.
    pub op: String,
    pub phase: String,
    /// Microseconds since the profiler started: the span's start on the host clock plus the op's start after it
    /// on the device's clock.
    pub start_us: f64,
    pub duration_us: f64,
    pub flops: f64,
    pub bytes: f64,
}

/// A phase as it ran: a stretch of wall time whose ops share a label.
#[derive(Clone, Debug)]
struct Span {
    name: String,
    start_us: f64,
    end_us: f64,
}

/// An op whose timestamps are not read yet.
struct Pending<T> {
    op: String,
    start: T,
    end: T,
    flops: f64,
    bytes: f64,
}

/// The span running now: where it starts on both clocks, and its ops so far.
struct Open<T> {
    name: String,
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
}

/// A weight with what profiling needs to know of it.
pub struct ProfiledWeight<W> {
    inner: W,
    rows: usize,
    cols: usize,
    bytes: usize,
}

/// A layout with the step it describes (attention work depends on each sequence's positions).
pub struct ProfiledLayout<L> {
    inner: L,
    step: StepLayout,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Profiled {
            inner,
            epoch: Instant::now(),
            records: Mutex::new(Vec::new()),
            spans: Mutex::new(Vec::new()),
            open: Mutex::new(None),
        }
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
            flops: p.flops,
            bytes: p.bytes,
        });
        self.records.lock().expect("records lock").extend(records);
        self.spans.lock().expect("spans lock").push(Span {
            name: span.name,
            start_us: span.start_us,
            end_us,
        });
    }

    /// Times one op between two stamps on the backend's clock, and records the work it did. An op outside any
    /// phase (model loading, engine set-up) is a span of phase "other" on its own, so nothing waits unread.
    fn op<T>(&self, op: impl Into<String>, flops: f64, bytes: f64, f: impl FnOnce() -> T) -> T {
        if self.open.lock().expect("open span lock").is_none() {
            return self.phase("other", || self.op(op, flops, bytes, f));
        }
        let start = self.inner.timestamp();
        let out = f();
        let end = self.inner.timestamp();
        let mut open = self.open.lock().expect("open span lock");
        open.as_mut().expect("checked above").ops.push(Pending {
            op: op.into(),
            start,
            end,
            flops,
            bytes,
        });
        out
    }

    pub fn records(&self) -> Vec<Record> {
        self.records.lock().expect("records lock").clone()
    }

    /// Bytes of `elements` activation values.
    fn act(&self, elements: usize) -> f64 {
        (elements * self.inner.activation_width()) as f64
    }

    fn numel(&self, t: &B::Tensor) -> usize {
        let (r, c) = self.inner.dims(t);
        r * c
    }

    /// Per-op table of one phase: calls, total and mean time, share of the phase's wall time, achieved bandwidth and
    /// FLOP rate and their shares of the ceilings. Ops in order of total time.
    pub fn table(&self, phase: &str, ceilings: &Ceilings) -> Vec<OpRow> {
        let wall_us = self.phase_us(phase);
        let mut by_op: BTreeMap<String, OpRow> = BTreeMap::new();
        for r in self.records().iter().filter(|r| r.phase == phase) {
            let row = by_op.entry(r.op.clone()).or_insert_with(|| OpRow {
                op: r.op.clone(),
                ..OpRow::default()
            });
            row.calls += 1;
            row.total_us += r.duration_us;
            row.flops += r.flops;
            row.bytes += r.bytes;
        }
        let mut rows: Vec<OpRow> = by_op.into_values().collect();
        for row in &mut rows {
            let seconds = row.total_us * 1e-6;
            row.share_of_phase = row.total_us / wall_us;
            row.gb_per_s = row.bytes / seconds / 1e9;
            row.gflop_per_s = row.flops / seconds / 1e9;
            row.share_of_bandwidth = row.bytes / seconds / ceilings.copy_bytes_per_s;
            row.share_of_matmul = row.flops / seconds / ceilings.matmul_flops_per_s;
        }
        rows.sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
        rows
    }

    /// Wall time of a phase, microseconds (all its spans).
    pub fn phase_us(&self, phase: &str) -> f64 {
        self.spans
            .lock()
            .expect("spans lock")
            .iter()
            .filter(|s| s.name == phase)
            .map(|s| s.end_us - s.start_us)
            .sum()
    }

    /// Every phase and op as Chrome trace events (`ph: X`, microseconds): phases on thread 0, ops on thread 1.
    pub fn chrome_trace(&self) -> serde_json::Value {
        let spans = self.spans.lock().expect("spans lock").clone();
        let phases = spans.iter().map(|s| {
            json!({"name": s.name, "cat": "phase", "ph": "X", "pid": 1, "tid": 0,
                   "ts": s.start_us, "dur": s.end_us - s.start_us})
        });
        let ops = self.records().into_iter().map(|r| {
            json!({"name": r.op, "cat": r.phase, "ph": "X", "pid": 1, "tid": 1,
                   "ts": r.start_us, "dur": r.duration_us,
                   "args": {"gflop": r.flops / 1e9, "mb": r.bytes / 1e6}})
        });
        let names = [(0, "phases"), (1, "ops")].map(|(tid, name)| {
            json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}})
        });
        json!({
            "traceEvents": phases.chain(ops).chain(names).collect::<Vec<_>>(),
            "displayTimeUnit": "ms",
        })
    }
}

/// Runs `batch` requests (one image and `prompt_tokens` text tokens each) through the engine: the step that encodes
/// their images and prefills their prompts as phase `prefill`, then `decode_steps` steps as phase `decode`, one
/// span each. NVTX ranges name the phases and each decode step for Nsight Systems (the model adds `vision`).
pub fn profile_steps<B: Backend>(
    p: &Pipeline<Profiled<B>>,
    prompt_tokens: usize,
    batch: usize,
    decode_steps: usize,
) -> Result<()> {
    let prompt = bench_prompt(p, prompt_tokens, 0)?;
    let pixels = bench_pixels(p);
    let new_tokens = decode_steps + 1;
    let mut engine = bench_engine(p, batch, prompt.ids.len() + new_tokens, false)?;
    for _ in 0..batch {
        engine.add_request(
            prompt.clone(),
            vec![pixels.clone()],
            &bench_request(new_tokens),
        )?;
    }
    let b = &p.backend;
    {
        let _range = nvtx::range("prefill");
        b.phase("prefill", || engine.step())?;
    }
    let _range = nvtx::range("decode");
    (1..=decode_steps).try_for_each(|step| {
        let _range = nvtx::range(&format!("decode step {step}"));
        b.phase("decode", || engine.step().map(drop))
    })
}

/// One line of the per-op table.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct OpRow {
    pub op: String,
    pub calls: usize,
    pub total_us: f64,
    pub flops: f64,
    pub bytes: f64,
    pub share_of_phase: f64,
    pub gb_per_s: f64,
    pub gflop_per_s: f64,
    pub share_of_bandwidth: f64,
    pub share_of_matmul: f64,
}

impl<B: Backend> Backend for Profiled<B> {
    type Tensor = B::Tensor;
    type Weight = ProfiledWeight<B::Weight>;
    type Layout = ProfiledLayout<B::Layout>;
    type Timestamp = B::Timestamp;

    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn synchronize(&self) {
        self.inner.synchronize()
    }
    fn timestamp(&self) -> B::Timestamp {
        self.inner.timestamp()
    }
    fn elapsed_us(&self, from: &B::Timestamp, to: &B::Timestamp) -> f64 {
        self.inner.elapsed_us(from, to)
    }
    fn free_memory(&self) -> Result<usize> {
        self.inner.free_memory()
    }
    fn measure_ceilings(&self) -> Ceilings {
        self.inner.measure_ceilings()
    }
    fn weight_width(&self, stored: DType) -> usize {
        self.inner.weight_width(stored)
    }
    fn activation_width(&self) -> usize {
        self.inner.activation_width()
    }

    fn load_weight(&self, t: &TensorRef) -> Result<Self::Weight> {
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
    fn from_host(&self, data: Vec<f32>, rows: usize, cols: usize) -> Self::Tensor {
        let bytes = (data.len() * 4) as f64;
        self.op("from_host", 0.0, bytes, || {
            self.inner.from_host(data, rows, cols)
        })
    }
    fn to_host(&self, t: &Self::Tensor) -> Vec<f32> {
        let bytes = (self.numel(t) * 4) as f64;
        self.op("to_host", 0.0, bytes, || self.inner.to_host(t))
    }
    fn dims(&self, t: &Self::Tensor) -> (usize, usize) {
        self.inner.dims(t)
    }
    fn weight_to_tensor(&self, w: &Self::Weight) -> Self::Tensor {
        let bytes = w.bytes as f64 + self.act(w.rows * w.cols);
        self.op("weight_to_tensor", 0.0, bytes, || {
            self.inner.weight_to_tensor(&w.inner)
        })
    }
    fn zeros(&self, rows: usize, cols: usize) -> Self::Tensor {
        self.op("zeros", 0.0, self.act(rows * cols), || {
            self.inner.zeros(rows, cols)
        })
    }
    fn slice_rows(&self, t: &Self::Tensor, start: usize, len: usize) -> Self::Tensor {
        let bytes = 2.0 * self.act(len * self.inner.dims(t).1);
        self.op("slice_rows", 0.0, bytes, || {
            self.inner.slice_rows(t, start, len)
        })
    }
    fn concat_rows(&self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor {
        let bytes = 2.0 * self.act(self.numel(a) + self.numel(b));
        self.op("concat_rows", 0.0, bytes, || self.inner.concat_rows(a, b))
    }
    fn concat_cols(&self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor {
        let bytes = 2.0 * self.act(self.numel(a) + self.numel(b));
        self.op("concat_cols", 0.0, bytes, || self.inner.concat_cols(a, b))
    }
    fn write_rows(&self, dst: &mut Self::Tensor, row: usize, src: &Self::Tensor) {
        let bytes = 2.0 * self.act(self.numel(src));
        self.op("write_rows", 0.0, bytes, || {
            self.inner.write_rows(dst, row, src)
        })
    }
    fn gather_rows(&self, t: &Self::Tensor, rows: &[usize]) -> Self::Tensor {
        let bytes = 2.0 * self.act(rows.len() * self.inner.dims(t).1);
        self.op("gather_rows", 0.0, bytes, || {
            self.inner.gather_rows(t, rows)
        })
    }
    fn layout(&self, step: &StepLayout) -> Self::Layout {
        let inner = self.op("layout", 0.0, 0.0, || self.inner.layout(step));
        ProfiledLayout {
            inner,
            step: step.clone(),
        }
    }
    fn write_kv(&self, pool: &mut Self::Tensor, layout: &Self::Layout, rows: &Self::Tensor) {
        let bytes = 2.0 * self.act(self.numel(rows));
        self.op("write_kv", 0.0, bytes, || {
            self.inner.write_kv(pool, &layout.inner, rows)
        })
    }

    fn embedding(
        &self,
        ids: &[u32],
        table: &Self::Weight,
        extra: Option<&Self::Weight>,
    ) -> Result<Self::Tensor> {
        let row_bytes = table.bytes as f64 / table.rows.max(1) as f64;
        let bytes = ids.len() as f64 * row_bytes + self.act(ids.len() * table.cols);
        self.op("embedding", 0.0, bytes, || {
            self.inner
                .embedding(ids, &table.inner, extra.map(|e| &e.inner))
        })
    }
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Self::Tensor {
        let m = self.inner.dims(x).0;
        let flops = 2.0 * (m * w.rows * w.cols) as f64;
        let bytes =
            (w.bytes + bias.map_or(0, |b| b.bytes)) as f64 + self.act(m * (w.rows + w.cols));
        self.op(
            format!("linear {}x{}", w.rows, w.cols),
            flops,
            bytes,
            || self.inner.linear(x, &w.inner, bias.map(|b| &b.inner)),
        )
    }
    fn add_assign(&self, acc: &mut Self::Tensor, x: &Self::Tensor) {
        let bytes = 3.0 * self.act(self.numel(x));
        self.op("add", 0.0, bytes, || self.inner.add_assign(acc, x))
    }
    fn add_gated(&self, acc: &mut Self::Tensor, x: &Self::Tensor, alpha: &Self::Weight) {
        let bytes = 3.0 * self.act(self.numel(x));
        self.op("add_gated", 0.0, bytes, || {
            self.inner.add_gated(acc, x, &alpha.inner)
        })
    }
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        b: &Self::Weight,
        eps: f32,
    ) -> Self::Tensor {
        let bytes = 2.0 * self.act(self.numel(x)) + (w.bytes + b.bytes) as f64;
        self.op("layer_norm", 0.0, bytes, || {
            self.inner.layer_norm(x, &w.inner, &b.inner, eps)
        })
    }
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Self::Tensor {
        let bytes = 2.0 * self.act(self.numel(x)) + w.bytes as f64;
        self.op("rms_norm", 0.0, bytes, || {
            self.inner.rms_norm(x, &w.inner, eps)
        })
    }
    fn activate(&self, x: &mut Self::Tensor, act: Activation) {
        let bytes = 2.0 * self.act(self.numel(x));
        self.op("activate", 0.0, bytes, || self.inner.activate(x, act))
    }
    fn swiglu(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Self::Tensor {
        let bytes = 3.0 * self.act(self.numel(gate));
        self.op("swiglu", 0.0, bytes, || self.inner.swiglu(gate, up))
    }
    fn rope(&self, x: &mut Self::Tensor, head_dim: usize, layout: &Self::Layout, theta: f64) {
        let bytes = 2.0 * self.act(self.numel(x));
        self.op("rope", 0.0, bytes, || {
            self.inner.rope(x, head_dim, &layout.inner, theta)
        })
    }

    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
    ) -> Self::Tensor {
        let ((tq, w), tk) = (self.inner.dims(q), self.inner.dims(k).0);
        let flops = 4.0 * (tq * tk * w) as f64;
        let bytes = self.act(2 * tq * w + 2 * tk * w);
        self.op("attention", flops, bytes, || {
            self.inner.attention(q, k, v, heads)
        })
    }
    fn paged_attention(
        &self,
        q: &Self::Tensor,
        k_pool: &Self::Tensor,
        v_pool: &Self::Tensor,
        heads: usize,
        layout: &Self::Layout,
    ) -> Self::Tensor {
        let (rows, w) = self.inner.dims(q);
        // Each row attends to the positions up to its own; each sequence's cached K/V is read once.
        let keys: usize = layout.step.row_positions().map(|(_, pos)| pos + 1).sum();
        let cached: usize = layout.step.seqs.iter().map(|s| s.kv_len).sum();
        let flops = 4.0 * (keys * w) as f64;
        let bytes = self.act(2 * rows * w + 2 * cached * w);
        self.op("paged_attention", flops, bytes, || {
            self.inner
                .paged_attention(q, k_pool, v_pool, heads, &layout.inner)
        })
    }
    fn cross_attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
        layout: &Self::Layout,
        per_image: usize,
    ) -> Self::Tensor {
        let (rows, w) = self.inner.dims(q);
        let image_rows: Vec<i32> = layout
            .step
            .seqs
            .iter()
            .flat_map(|s| s.image_of_row.iter().copied())
            .filter(|&i| i >= 0)
            .collect();
        let mut images = image_rows.clone();
        images.sort_unstable();
        images.dedup();
        let flops = 4.0 * (image_rows.len() * per_image * w) as f64;
        let bytes = self.act(2 * rows * w + 2 * images.len() * per_image * w);
        self.op("cross_attention", flops, bytes, || {
            self.inner
                .cross_attention(q, k, v, heads, &layout.inner, per_image)
        })
    }
    /// A recorded step runs eagerly here, so that each of its ops is timed on its own (and an engine's padded
    /// decode steps can be checked on any backend).
    type StepGraphs = ();
    fn new_step_graphs(&self, _head_dim: usize) -> Option<()> {
        Some(())
    }
    fn run_recorded(
        &self,
        _graphs: &mut (),
        _ids: &[u32],
        step: &StepLayout,
        _shape: DecodeShape,
        rows: usize,
        run: &mut dyn FnMut(&Self::Layout) -> Result<Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let out = run(&self.layout(step))?;
        Ok(self.slice_rows(&out, 0, rows))
    }
    fn sample(&self, logits: &Self::Tensor, rows: &[RowSampling]) -> Result<Vec<u32>> {
        let (n, vocab) = self.inner.dims(logits);
        let bytes = self.act(n * vocab);
        self.op("sample", 0.0, bytes, || self.inner.sample(logits, rows))
    }
    fn resampler_attention(
        &self,
        q: &Self::Tensor,
        k_ctx: &Self::Tensor,
        v_ctx: &Self::Tensor,
        k_lat: &Self::Tensor,
        v_lat: &Self::Tensor,
        heads: usize,
    ) -> Self::Tensor {
        let (tq, w) = self.inner.dims(q);
        let keys = self.inner.dims(k_ctx).0 + self.inner.dims(k_lat).0;
        let flops = 4.0 * (tq * keys * w) as f64;
        let bytes = self.act(2 * tq * w + 2 * keys * w);
        self.op("resampler_attention", flops, bytes, || {
            self.inner
                .resampler_attention(q, k_ctx, v_ctx, k_lat, v_lat, heads)
        })
    }
}
