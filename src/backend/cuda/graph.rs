//! Recorded decode steps: CUDA graphs of a whole decode step (decoder and LM head), one per batch size, replayed
//! with new data. A decode step of IDEFICS-9B is some 600 small launches; replaying them as one graph removes the
//! launch overhead that otherwise rivals the step's 3.7 ms memory floor at small batches.
//!
//! What makes a replay valid is that every launch's arguments stay the same:
//! - the step is laid out in a fixed [`DecodeShape`] (block tables of one width, attention split for the longest
//!   context), so kernel geometry does not follow the sequences' lengths; empty attention splits add exact zeros,
//!   so results are bit-identical to an eager step's;
//! - the step's int32 arrays and token ids live in one buffer the graph owns; a replay writes the new ones into it
//!   (in stream order) before launching;
//! - every buffer the step takes comes from a private pool (a sibling of the backend's, [`Pool::sibling`](super::memory::Pool::sibling)): an
//!   eager warm-up run fills it, the captured run reuses exactly those buffers, and no other op ever gets them;
//! - weights, KV and media pools stay where they are for the engine's life, and the graphs die with the engine.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus};
use cudarc::driver::{result, CudaGraph, CudaStream};

use super::context::{CudaBackend, CudaTensor, Recording};
use super::device::describe;
use super::launchers::PagedAttention;
use super::layout::{CudaLayout, LayoutPlan};
use crate::backend::{Backend, DecodeShape, StepLayout};
use crate::error::{Error, Result};

/// One engine's recorded steps, by batch size and shape.
pub struct StepGraphs {
    by_size: HashMap<(usize, DecodeShape), StepGraph>,
    /// The backend's stream, waited for before the graphs' buffers go back to the driver.
    stream: Arc<CudaStream>,
}

impl Drop for StepGraphs {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

struct StepGraph {
    graph: CudaGraph,
    /// The layout the graph reads; it owns the input buffer each replay rewrites.
    layout: CudaLayout,
    inputs_len: usize,
    output: CudaTensor,
}

// SAFETY: a CUDA graph is not internally synchronised; a `StepGraph` is only reached through `&mut StepGraphs`,
// so one thread at a time uses it, which is all the driver asks.
unsafe impl Send for StepGraph {}

impl StepGraphs {
    /// Recording needs the `paged_attention_d*` kernel for the head dim (the flash fallback uploads per step).
    pub(super) fn new(head_dim: usize, stream: Arc<CudaStream>) -> Option<StepGraphs> {
        PagedAttention::D
            .contains(&head_dim)
            .then(|| StepGraphs {
                by_size: HashMap::new(),
                stream,
            })
    }
}

/// However recording ends (done, an error, a panic): ends a capture still open (active or invalidated) without
/// instantiating it, waits for the work queued so far (the warm-up's kernels read buffers that may be freed
/// next), and clears the recording state.
struct RecordingGuard<'a>(&'a CudaBackend);

impl<'a> RecordingGuard<'a> {
    fn start(b: &'a CudaBackend, r: Recording) -> Self {
        *b.recording.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
        RecordingGuard(b)
    }
}

impl Drop for RecordingGuard<'_> {
    fn drop(&mut self) {
        let stream = &self.0.stream;
        let open = stream.capture_status().ok();
        if open.is_some_and(|s| s != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE) {
            // SAFETY: the stream is capturing; the graph ending it is ours alone, destroyed uninstantiated.
            unsafe {
                if let Ok(graph) = result::stream::end_capture(stream.cu_stream()) {
                    if !graph.is_null() {
                        let _ = result::graph::destroy(graph);
                    }
                }
            }
        }
        let _ = stream.synchronize();
        *self
            .0
            .recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// See [`Backend::run_recorded`](crate::backend::Backend::run_recorded).
pub(super) fn run_recorded(
    b: &CudaBackend,
    graphs: &mut StepGraphs,
    ids: &[u32],
    step: &StepLayout,
    shape: DecodeShape,
    rows: usize,
    run: &mut dyn FnMut(&CudaLayout) -> Result<CudaTensor>,
) -> Result<CudaTensor> {
    assert!(
        step.seqs.iter().all(|s| s.q_rows == 1) && ids.len() == step.seqs.len(),
        "a recorded step decodes one row per sequence"
    );
    let mut plan =
        LayoutPlan::new(step, Some(&shape)).map_err(|why| Error::Device(describe(&b.ctx), why))?;
    let ids_at = plan.push_ids(ids);
    let key = (step.seqs.len(), shape);
    if let Some(g) = graphs.by_size.get(&key) {
        assert_eq!(
            plan.arrays().len(),
            g.inputs_len,
            "same size and shape, same arrays"
        );
        b.htod(g.layout.array(0), plan.arrays());
        b.check("graph launch", g.graph.launch());
        // A copy: the graph's output buffer is rewritten by its next replay.
        return Ok(b.slice_rows(&g.output, 0, rows));
    }
    let g = record(b, step, plan, ids_at, run)?;
    let out = b.slice_rows(&g.output, 0, rows);
    graphs.by_size.insert(key, g);
    Ok(out)
}

/// Records `run` on `step` (laid out by `plan`, its ids at `ids_at`) and launches the graph once, which
/// computes this step (the capture itself runs nothing).
fn record(
    b: &CudaBackend,
    step: &StepLayout,
    plan: LayoutPlan,
    ids_at: usize,
    run: &mut dyn FnMut(&CudaLayout) -> Result<CudaTensor>,
) -> Result<StepGraph> {
    let err = |what: &str, e: cudarc::driver::DriverError| {
        Error::Device(
            describe(&b.ctx),
            format!("recording a decode step: {what}: {e}"),
        )
    };
    let pool = b.pool.sibling();
    let inputs_len = plan.arrays().len();
    let inputs = pool.take(inputs_len * 4);
    b.htod(inputs.ptr, plan.arrays());
    let layout = CudaLayout::from_plan(b, step, plan, inputs);
    let guard = RecordingGuard::start(
        b,
        Recording {
            pool,
            ids: layout.array(ids_at),
            rows: step.seqs.len(),
            spoiled: None,
        },
    );
    // The warm-up fills the private pool, so the captured run takes only buffers that exist already.
    drop(run(&layout)?);
    b.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| err("beginning the capture", e))?;
    let output = run(&layout)?;
    let graph = b
        .stream
        .end_capture(CUgraphInstantiate_flags(0))
        .map_err(|e| err("ending the capture", e))?
        .ok_or_else(|| Error::Device(describe(&b.ctx), "the captured step is empty".into()))?;
    let spoiled = b
        .recording
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
        .and_then(|r| r.spoiled.take());
    if let Some(why) = spoiled {
        return Err(Error::Device(
            describe(&b.ctx),
            format!("recording a decode step: {why}"),
        ));
    }
    drop(guard);
    graph.launch().map_err(|e| err("first launch", e))?;
    Ok(StepGraph {
        graph,
        layout,
        inputs_len,
        output,
    })
}
