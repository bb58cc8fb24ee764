//! The CUDA backend: the hand-written kernels of `kernels/` behind the [`Backend`] trait.
//!
//! - One context and one stream per backend; every op is queued on that stream, and only `to_host` waits for it.
//! - Activations are `[rows, cols]` row-major in the backend's [`ActDtype`], bf16 unless made with
//!   [`CudaBackend::with_activations`] (`--dtype f16`), which picks the kernels' variant; kernels accumulate and take
//!   softmaxes in f32. Host data is rounded to that type on the way in (`from_host`) and widened on the way out
//!   (`to_host`).
//! - Weights are uploaded in the same type (other checkpoint dtypes are converted; a value past f16's range is an
//!   error naming the tensor), bump-allocated from one device allocation when the caller reserves it
//!   ([`CudaBackend::reserve_weights`]).
//! - Activations and per-step scratch come from a caching pool ([`memory`]): after one warm-up step a step of the
//!   same shape makes no driver allocation ([`CudaBackend::device_allocations`] counts them).
//! - Head dims the attention kernels lack (they have 64, 80, 96, 128) run zero-padded to the next size they have.
//! - Errors: setup (driver, device, kernel loading, weight upload) returns [`Error::Device`]; a failure inside an
//!   op after that is a device fault the trait's tensor-returning ops cannot carry, and panics naming the kernel.
//!
//! Batch invariance: a row's result does not depend on the other rows of its step. Linear layers take the GEMV
//! kernel for steps of up to [`GEMV_MAX_ROWS`] rows (every decode step) and the tensor-core GEMM above; each
//! kernel's reduction order depends on K only, so rows are bit-identical across batch sizes within each regime.
//! Attention rows are independent by construction (see `kernels/flash_common.cuh` and `attention.cu`).
//!
//! Files: `context.rs` (the backend's state, allocation, copies, launches), `ops/` (one file per kernel file),
//! `launchers.rs` (the typed kernel arguments build.rs generates), `layout.rs` (a step as the kernels read it),
//! `graph.rs` (recorded decode steps), `kernels.rs` / `nvrtc.rs` / `libs.rs` (loading the kernels), `memory.rs`,
//! `timing.rs`, `device.rs`, `ceilings.rs` and `cublas.rs` (the yardstick). This file forwards each trait method
//! to the op of the same name.

mod ceilings;
mod context;
mod cublas;
mod device;
mod graph;
pub mod kernels;
// A kernel that no op launches is an argument struct never built: a build error, not a warning.
#[deny(dead_code)]
mod launchers;
mod layout;
mod libs;
mod memory;
pub mod nvrtc;
mod ops;
mod timing;

use cudarc::driver::result;

pub use ceilings::CeilingSizes;
pub use context::{CudaBackend, CudaTensor, CudaWeight};
pub use cublas::library as cublas_library;
pub use device::{describe, device_count, driver_present, driver_version};
pub use launchers::ActDtype;
pub use layout::CudaLayout;
pub use ops::gemm::GEMV_MAX_ROWS;
use ops::{
    activation, attention, copy, cross_attention, embedding, gemm, norm, resampler_attention, rope,
    sampling,
};

use super::{Backend, Ceilings, DecodeShape, RowSampling, Sampled, StepLayout};
use crate::error::{Error, Result};
use crate::io::config::{Activation, Alibi, RopeFrequencies};
use crate::io::safetensors::{DType, TensorRef};

impl CudaBackend {
    /// The ceilings measured on `sizes` of work instead of the chip-saturating default of
    /// [`Backend::measure_ceilings`].
    pub fn measure_ceilings_at(&self, sizes: CeilingSizes) -> Ceilings {
        ceilings::measure(self, sizes)
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Layout = CudaLayout;
    type Timestamp = timing::Stamp;
    type StepGraphs = graph::StepGraphs;

    fn device_name(&self) -> String {
        describe(&self.ctx)
    }

    fn synchronize(&self) {
        CudaBackend::synchronize(self)
    }

    fn timestamp(&self) -> timing::Stamp {
        self.events.stamp(&self.stream)
    }

    fn elapsed_us(&self, from: &timing::Stamp, to: &timing::Stamp) -> f64 {
        from.us_until(to)
    }

    fn free_memory(&self) -> Result<usize> {
        self.bind();
        result::mem_get_info()
            .map(|(free, _total)| free)
            .map_err(|e| Error::Device(describe(&self.ctx), format!("reading free memory: {e}")))
    }

    fn measure_ceilings(&self) -> Ceilings {
        ceilings::measure(self, CeilingSizes::CHIP)
    }

    /// Every weight is uploaded as bf16 or f16 (the activation type).
    fn weight_width(&self, _stored: DType) -> usize {
        2
    }

    /// Activations and the KV cache are bf16 or f16.
    fn activation_width(&self) -> usize {
        2
    }

    fn load_weight(&self, t: &TensorRef) -> Result<CudaWeight> {
        let (rows, cols) = match t.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [r, rest @ ..] => (*r, rest.iter().product()),
        };
        let ptr = self.upload_weight(t, rows * cols)?;
        Ok(CudaWeight { ptr, rows, cols })
    }

    fn from_host(&self, data: Vec<f32>, rows: usize, cols: usize) -> CudaTensor {
        copy::from_host(self, data, rows, cols)
    }

    fn to_host(&self, t: &CudaTensor) -> Vec<f32> {
        copy::to_host(self, t)
    }

    fn dims(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn weight_to_tensor(&self, w: &CudaWeight) -> CudaTensor {
        copy::weight_to_tensor(self, w)
    }

    fn zeros(&self, rows: usize, cols: usize) -> CudaTensor {
        copy::zeros(self, rows, cols)
    }

    fn slice_rows(&self, t: &CudaTensor, start: usize, len: usize) -> CudaTensor {
        copy::slice_rows(self, t, start, len)
    }

    fn concat_rows(&self, a: &CudaTensor, b: &CudaTensor) -> CudaTensor {
        copy::concat_rows(self, a, b)
    }

    fn concat_cols(&self, a: &CudaTensor, b: &CudaTensor) -> CudaTensor {
        copy::concat_cols(self, a, b)
    }

    fn write_rows(&self, dst: &mut CudaTensor, row: usize, src: &CudaTensor) {
        copy::write_rows(self, dst, row, src)
    }

    fn gather_rows(&self, t: &CudaTensor, rows: &[usize]) -> CudaTensor {
        copy::gather_rows(self, t, rows)
    }

    fn layout(&self, step: &StepLayout) -> CudaLayout {
        CudaLayout::new(self, step)
    }

    fn write_kv(&self, pool: &mut CudaTensor, layout: &CudaLayout, rows: &CudaTensor) {
        copy::write_kv(self, pool, layout, rows)
    }

    fn embedding(
        &self,
        ids: &[u32],
        table: &CudaWeight,
        extra: Option<&CudaWeight>,
    ) -> Result<CudaTensor> {
        embedding::embedding(self, ids, table, extra)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaWeight>) -> CudaTensor {
        gemm::linear(self, x, w, bias)
    }

    fn add_assign(&self, acc: &mut CudaTensor, x: &CudaTensor) {
        activation::add_assign(self, acc, x)
    }

    fn add_gated(&self, acc: &mut CudaTensor, x: &CudaTensor, alpha: &CudaWeight) {
        activation::add_gated(self, acc, x, alpha)
    }

    fn layer_norm(&self, x: &CudaTensor, w: &CudaWeight, b: &CudaWeight, eps: f32) -> CudaTensor {
        norm::layer_norm(self, x, w, b, eps)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> CudaTensor {
        norm::rms_norm(self, x, w, eps)
    }

    fn activate(&self, x: &mut CudaTensor, act: Activation) {
        activation::activate(self, x, act)
    }

    fn swiglu(&self, gate: &CudaTensor, up: &CudaTensor) -> CudaTensor {
        activation::swiglu(self, gate, up)
    }

    fn rope(
        &self,
        q: &mut CudaTensor,
        k: &mut CudaTensor,
        head_dim: usize,
        layout: &CudaLayout,
        freqs: &RopeFrequencies,
    ) {
        rope::rope(self, q, k, head_dim, layout, freqs)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
    ) -> CudaTensor {
        attention::attention(self, q, k, v, heads)
    }

    fn paged_attention(
        &self,
        q: &CudaTensor,
        k_pool: &CudaTensor,
        v_pool: &CudaTensor,
        heads: usize,
        layout: &CudaLayout,
        alibi: Option<&Alibi>,
    ) -> CudaTensor {
        attention::paged_attention(self, q, k_pool, v_pool, heads, layout, alibi)
    }

    fn cross_attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
        layout: &CudaLayout,
        per_image: usize,
    ) -> CudaTensor {
        cross_attention::cross_attention(self, q, k, v, heads, layout, per_image)
    }

    fn new_step_graphs(&self, head_dim: usize) -> Option<graph::StepGraphs> {
        graph::StepGraphs::new(head_dim, self.stream.clone())
    }

    fn run_recorded(
        &self,
        graphs: &mut graph::StepGraphs,
        ids: &[u32],
        step: &StepLayout,
        shape: DecodeShape,
        rows: usize,
        run: &mut dyn FnMut(&CudaLayout) -> Result<CudaTensor>,
    ) -> Result<CudaTensor> {
        graph::run_recorded(self, graphs, ids, step, shape, rows, run)
    }

    fn sample(&self, logits: &CudaTensor, rows: &[RowSampling]) -> Result<Vec<Sampled>> {
        sampling::sample(self, logits, rows)
    }

    fn resampler_attention(
        &self,
        q: &CudaTensor,
        k_ctx: &CudaTensor,
        v_ctx: &CudaTensor,
        k_lat: &CudaTensor,
        v_lat: &CudaTensor,
        heads: usize,
    ) -> CudaTensor {
        resampler_attention::resampler_attention(self, q, [k_ctx, v_ctx, k_lat, v_lat], heads)
    }
}
