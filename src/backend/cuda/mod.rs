//! The CUDA backend: the hand-written kernels of `kernels/` behind the [`Backend`] trait.
//!
//! - One context and one stream per backend; every op is queued on that stream, and only `to_host` waits for it.
//! - Activations are bf16 `[rows, cols]` row-major; kernels accumulate and take softmaxes in f32. Host data is
//!   rounded to bf16 on the way in (`from_host`) and widened on the way out (`to_host`).
//! - Weights are uploaded as bf16 (f32 and f16 checkpoints are converted), bump-allocated from one device
//!   allocation when the caller reserves it ([`CudaBackend::reserve_weights`]).
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

mod attention;
mod ceilings;
mod cublas;
mod device;
mod graph;
pub mod kernels;
mod libs;
mod memory;
pub mod nvrtc;
mod sampling;
mod timing;

use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaStream};

pub use attention::CudaLayout;
pub use ceilings::CeilingSizes;
pub use cublas::library as cublas_library;
pub use device::{describe, device_count, driver_present, driver_version};
use kernels::{float, int, launch, long, ptr, stride_grid, Arg, Kernels};
use memory::{Buffer, Pool, WeightArena};

use super::{Backend, Ceilings, DecodeShape, RowSampling, StepLayout};
use crate::error::{Error, Result};
use crate::io::config::Activation;
use crate::io::safetensors::{DType, TensorRef};

/// Steps of up to this many rows use the GEMV kernel for every linear layer (see the module docs).
pub const GEMV_MAX_ROWS: usize = 64;

/// Epilogue / activation codes of `kernels/common.cuh`.
const EPI_NONE: i32 = 0;
const EPI_BIAS: i32 = 1;

/// bf16 NaN: what fresh tensors are filled with when poisoning is on.
const BF16_NAN: u16 = 0x7fc0;

/// A bf16 activation `[rows, cols]` on the device (no buffer when empty).
pub struct CudaTensor {
    buf: Option<Buffer>,
    rows: usize,
    cols: usize,
}

impl CudaTensor {
    fn ptr(&self) -> u64 {
        self.buf.as_ref().map_or(0, |b| b.ptr)
    }

    /// Device address of row `r`.
    fn row(&self, r: usize) -> u64 {
        self.ptr() + (r * self.cols * 2) as u64
    }

    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// A bf16 parameter `[rows, cols]` in the weight arena.
pub struct CudaWeight {
    ptr: u64,
    rows: usize,
    cols: usize,
}

impl CudaWeight {
    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    pool: Arc<Pool>,
    weights: Mutex<WeightArena>,
    events: Arc<timing::EventPool>,
    sm_count: usize,
    poison: bool,
    /// Set while a decode step is being recorded (see [`graph`]).
    recording: Mutex<Option<graph::Recording>>,
}

impl CudaBackend {
    /// The ceilings measured on `sizes` of work instead of the chip-saturating default of
    /// [`Backend::measure_ceilings`].
    pub fn measure_ceilings_at(&self, sizes: CeilingSizes) -> Ceilings {
        ceilings::measure(self, sizes)
    }

    /// A backend on CUDA device `ordinal`: context, stream, and every kernel loaded.
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = device::open(ordinal)?;
        let err = |what: &str, e: cudarc::driver::DriverError| {
            Error::Device(format!("cuda:{ordinal}"), format!("{what}: {e}"))
        };
        let stream = ctx.new_stream().map_err(|e| err("creating a stream", e))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| err("multiprocessor count", e))? as usize;
        let kernels = Kernels::load(&ctx)?;
        let pool = Pool::new(ctx.clone());
        Ok(CudaBackend {
            weights: Mutex::new(WeightArena::new(pool.clone())),
            events: timing::EventPool::new(ctx.clone()),
            ctx,
            stream,
            kernels,
            pool,
            sm_count,
            poison: false,
            recording: Mutex::new(None),
        })
    }

    /// One line saying which device this is and where its kernels came from.
    pub fn summary(&self) -> String {
        let origin = match &self.kernels.origin {
            kernels::KernelOrigin::Nvcc(v) => format!("prebuilt kernels ({v})"),
            kernels::KernelOrigin::Nvrtc { version, arch } => {
                format!("NVRTC {}.{} kernels for {arch}", version.0, version.1)
            }
        };
        format!("{}; {origin}", describe(&self.ctx))
    }

    /// Fills every tensor the backend hands out with NaN before a kernel writes it, so a test sees any element a
    /// kernel fails to write.
    pub fn set_poison(&mut self, on: bool) {
        self.poison = on;
    }

    /// Driver allocations made so far (activations, scratch, weights).
    pub fn device_allocations(&self) -> usize {
        self.pool.allocations()
    }

    /// CUDA events created for timestamps so far (they are pooled and reused).
    pub fn timing_events(&self) -> usize {
        self.events.created()
    }

    /// Reserves one device allocation for `bytes` of bf16 weights, which `load_weight` then fills in order.
    pub fn reserve_weights(&self, bytes: usize) {
        self.weights
            .lock()
            .expect("weight arena lock")
            .reserve(bytes);
    }

    /// Waits for every queued op.
    pub fn synchronize(&self) {
        self.stream
            .synchronize()
            .unwrap_or_else(|e| panic!("CUDA stream failed: {e}"));
    }

    fn run(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) {
        launch(&self.kernels, &self.stream, name, grid, block, args);
    }

    fn check(&self, what: &str, r: std::result::Result<(), cudarc::driver::DriverError>) {
        r.unwrap_or_else(|e| panic!("CUDA {what} failed: {e}"));
    }

    fn bind(&self) {
        self.check("context binding", self.ctx.bind_to_thread());
    }

    /// Where buffers come from now: the private pool of the step being recorded (so a recorded graph's buffers
    /// are never handed to anything else), else the backend's pool.
    fn pool(&self) -> Arc<Pool> {
        match &*self.recording.lock().expect("recording lock") {
            Some(r) => r.pool.clone(),
            None => self.pool.clone(),
        }
    }

    /// A fresh (poisoned when asked) bf16 tensor.
    fn alloc(&self, rows: usize, cols: usize) -> CudaTensor {
        let n = rows * cols;
        let buf = (n > 0).then(|| self.pool().take(n * 2));
        let t = CudaTensor { buf, rows, cols };
        if self.poison && n > 0 {
            self.bind();
            // SAFETY: the buffer holds at least n bf16 values.
            let rc =
                unsafe { sys::cuMemsetD16Async(t.ptr(), BF16_NAN, n, self.stream.cu_stream()) };
            self.check("poison fill", rc.result());
        }
        t
    }

    /// A scratch buffer of `n` f32 values.
    fn scratch_f32(&self, n: usize) -> Buffer {
        self.pool().take(n.max(1) * 4)
    }

    /// `data` on the device, as the kernels' int32 arrays.
    fn upload_i32(&self, data: &[i32]) -> Buffer {
        let buf = self.pool().take(data.len().max(1) * 4);
        self.htod(buf.ptr, data);
        buf
    }

    fn htod<T>(&self, dst: u64, src: &[T]) {
        if src.is_empty() {
            return;
        }
        // A graph would replay this copy from a host buffer that is gone by then: the copy still happens (the
        // step's own result stays right) and the recording is refused when it ends, so the engine runs such
        // steps kernel by kernel.
        if let Some(r) = self.recording.lock().expect("recording lock").as_mut() {
            r.spoiled.get_or_insert_with(|| {
                "a host-to-device copy inside the step: a graph cannot replay it with new data"
                    .into()
            });
        }
        self.bind();
        // SAFETY: dst holds at least size_of_val(src) bytes; pageable sources are staged before the call returns.
        self.check("host-to-device copy", unsafe {
            result::memcpy_htod_async(dst, src, self.stream.cu_stream())
        });
    }

    fn dtod(&self, dst: u64, src: u64, elems: usize) {
        if elems == 0 {
            return;
        }
        self.bind();
        // SAFETY: both ranges hold `elems` bf16 values (checked by the callers' shape asserts).
        self.check("device copy", unsafe {
            result::memcpy_dtod_async(dst, src, elems * 2, self.stream.cu_stream())
        });
    }

    /// `copy_rows_bf16` (kernels/copy.cu): row `i` of `dst` (or row `dst_idx[i]`) gets row `i` of `src` (or row
    /// `src_idx[i]`), per group of columns `d_src` wide in `src` and `d_dst` wide in `dst`, zero-padded.
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &self,
        dst: u64,
        src: u64,
        dst_idx: u64,
        src_idx: u64,
        rows: usize,
        groups: usize,
        d: (usize, usize),
        ld: (usize, usize),
    ) {
        let (d_dst, d_src) = d;
        self.run(
            "copy_rows_bf16",
            stride_grid(rows * groups * d_dst),
            256,
            &[
                ptr(dst),
                ptr(src),
                ptr(dst_idx),
                ptr(src_idx),
                int(rows),
                int(groups),
                int(d_dst),
                int(d_src),
                long(ld.0),
                long(ld.1),
            ],
        );
    }

    /// `t` with each of its `heads` column groups widened (zero-padded) or narrowed from `d_from` to `d_to`.
    fn regroup(&self, t: &CudaTensor, heads: usize, d_from: usize, d_to: usize) -> CudaTensor {
        let out = self.alloc(t.rows, heads * d_to);
        self.copy_rows(
            out.ptr(),
            t.ptr(),
            0,
            0,
            t.rows,
            heads,
            (d_to, d_from),
            (heads * d_to, t.cols),
        );
        out
    }

    /// Grid for the kernels of activation.cu: one thread per 8-column chunk.
    fn chunk_grid(rows: usize, cols: usize) -> (u32, u32, u32) {
        stride_grid(rows * cols.div_ceil(8))
    }

    fn upload_weight(&self, t: &TensorRef, n: usize) -> Result<u64> {
        let bf16: std::borrow::Cow<[u8]> = match t.dtype {
            DType::BF16 => t.bytes().into(),
            DType::F32 => t
                .bytes()
                .chunks_exact(4)
                .flat_map(|b| f32_to_bf16(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            DType::F16 => t
                .bytes()
                .chunks_exact(2)
                .flat_map(|b| f32_to_bf16(half::f16::from_le_bytes([b[0], b[1]]).to_f32()))
                .collect(),
        };
        if bf16.len() != n * 2 {
            return Err(Error::Invalid(format!(
                "{}: {} bytes of data for {n} values",
                t.name,
                t.bytes().len()
            )));
        }
        let dst = self.weights.lock().expect("weight arena lock").take(n * 2);
        self.htod(dst, &bf16);
        Ok(dst)
    }

    /// RMSNorm or LayerNorm over `w.len()`-wide groups of each row (the kernels normalise rows; a per-head norm is
    /// the same kernel on the `[rows * heads, d]` view).
    fn norm(
        &self,
        kernel: &str,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        eps: f32,
    ) -> CudaTensor {
        let width = w.len();
        assert!(
            width > 0 && x.cols % width == 0,
            "row width {} is not a multiple of the norm width {width}",
            x.cols
        );
        assert!(
            width <= 8192,
            "norm width {width} is over the kernels' 8192 (NORM_MAX_COLS in kernels/norm.cu)"
        );
        let out = self.alloc(x.rows, x.cols);
        let rows = x.len() / width;
        let mut args = vec![ptr(out.ptr()), ptr(x.ptr()), ptr(w.ptr)];
        if let Some(b) = bias {
            assert_eq!(b.len(), width, "LayerNorm bias and weight differ in length");
            args.push(ptr(b.ptr));
        }
        args.extend([int(rows), int(width), float(eps)]);
        self.run(kernel, (rows as u32, 1, 1), 256, &args);
        out
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Queued kernels may still read weights and modules that are freed right after this.
        let _ = self.stream.synchronize();
    }
}

/// bf16 by round-to-nearest-even, as the checkpoint conversion in PyTorch does.
fn f32_to_bf16(v: f32) -> [u8; 2] {
    half::bf16::from_f32(v).to_le_bytes()
}

fn activation_code(act: Activation) -> i32 {
    match act {
        Activation::Gelu => 3,
        Activation::Relu => 4,
        Activation::QuickGelu => 6,
        Activation::GeluTanh => 7,
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Layout = CudaLayout;
    type Timestamp = timing::Stamp;

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

    /// Every weight is uploaded as bf16.
    fn weight_width(&self, _stored: DType) -> usize {
        2
    }

    /// Activations and the KV cache are bf16.
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
        assert_eq!(
            data.len(),
            rows * cols,
            "host data does not fill [{rows}, {cols}]"
        );
        let t = self.alloc(rows, cols);
        let bf16: Vec<u16> = data
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        self.htod(t.ptr(), &bf16);
        t
    }

    fn to_host(&self, t: &CudaTensor) -> Vec<f32> {
        let mut raw = vec![0u16; t.len()];
        if !raw.is_empty() {
            self.bind();
            // SAFETY: the tensor holds t.len() bf16 values; the stream is synchronised before `raw` is read.
            self.check("device-to-host copy", unsafe {
                result::memcpy_dtoh_async(&mut raw, t.ptr(), self.stream.cu_stream())
            });
            self.synchronize();
        }
        raw.into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect()
    }

    fn dims(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn weight_to_tensor(&self, w: &CudaWeight) -> CudaTensor {
        let t = self.alloc(w.rows, w.cols);
        self.dtod(t.ptr(), w.ptr, w.len());
        t
    }

    fn zeros(&self, rows: usize, cols: usize) -> CudaTensor {
        let t = self.alloc(rows, cols);
        if t.len() > 0 {
            self.bind();
            // SAFETY: the buffer holds t.len() bf16 values.
            self.check("memset", unsafe {
                result::memset_d8_async(t.ptr(), 0, t.len() * 2, self.stream.cu_stream())
            });
        }
        t
    }

    fn slice_rows(&self, t: &CudaTensor, start: usize, len: usize) -> CudaTensor {
        assert!(
            start + len <= t.rows,
            "rows {start}..{} of {}",
            start + len,
            t.rows
        );
        let out = self.alloc(len, t.cols);
        self.dtod(out.ptr(), t.row(start), out.len());
        out
    }

    fn concat_rows(&self, a: &CudaTensor, b: &CudaTensor) -> CudaTensor {
        assert_eq!(a.cols, b.cols, "concatenating rows of different widths");
        let out = self.alloc(a.rows + b.rows, a.cols);
        self.dtod(out.ptr(), a.ptr(), a.len());
        self.dtod(out.row(a.rows), b.ptr(), b.len());
        out
    }

    fn concat_cols(&self, a: &CudaTensor, b: &CudaTensor) -> CudaTensor {
        assert_eq!(a.rows, b.rows, "concatenating columns of different heights");
        let out = self.alloc(a.rows, a.cols + b.cols);
        self.copy_rows(
            out.ptr(),
            a.ptr(),
            0,
            0,
            a.rows,
            1,
            (a.cols, a.cols),
            (out.cols, a.cols),
        );
        let right = out.ptr() + (a.cols * 2) as u64;
        self.copy_rows(
            right,
            b.ptr(),
            0,
            0,
            b.rows,
            1,
            (b.cols, b.cols),
            (out.cols, b.cols),
        );
        out
    }

    fn write_rows(&self, dst: &mut CudaTensor, row: usize, src: &CudaTensor) {
        assert_eq!(dst.cols, src.cols, "writing rows of a different width");
        assert!(
            row + src.rows <= dst.rows,
            "writing rows {row}..{} of {}",
            row + src.rows,
            dst.rows
        );
        self.dtod(dst.row(row), src.ptr(), src.len());
    }

    fn gather_rows(&self, t: &CudaTensor, rows: &[usize]) -> CudaTensor {
        let idx: Vec<i32> = rows
            .iter()
            .map(|&r| {
                assert!(r < t.rows, "gathering row {r} of {}", t.rows);
                r as i32
            })
            .collect();
        let out = self.alloc(rows.len(), t.cols);
        let idx = self.upload_i32(&idx);
        self.copy_rows(
            out.ptr(),
            t.ptr(),
            0,
            idx.ptr,
            rows.len(),
            1,
            (t.cols, t.cols),
            (t.cols, t.cols),
        );
        out
    }

    fn layout(&self, step: &StepLayout) -> CudaLayout {
        CudaLayout::new(self, step)
    }

    fn write_kv(&self, pool: &mut CudaTensor, layout: &CudaLayout, rows: &CudaTensor) {
        assert_eq!(pool.cols, rows.cols, "K/V rows and pool differ in width");
        assert_eq!(rows.rows, layout.rows(), "K/V rows do not match the step");
        layout.check_slots(pool.rows);
        let w = rows.cols;
        self.copy_rows(
            pool.ptr(),
            rows.ptr(),
            layout.slots(),
            0,
            rows.rows,
            1,
            (w, w),
            (w, w),
        );
    }

    fn embedding(
        &self,
        ids: &[u32],
        table: &CudaWeight,
        extra: Option<&CudaWeight>,
    ) -> Result<CudaTensor> {
        let (vocab_a, vocab_b) = (table.rows, extra.map_or(0, |e| e.rows));
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_a + vocab_b) {
            return Err(Error::Invalid(format!(
                "token id {id} is beyond the {} embedding rows",
                vocab_a + vocab_b
            )));
        }
        if let Some(e) = extra {
            assert_eq!(
                e.cols, table.cols,
                "the additional embedding differs in width"
            );
        }
        let out = self.alloc(ids.len(), table.cols);
        // A recorded step reads its ids from its layout's buffer, where each replay writes the new ones.
        // (Copied out first: asserting under the lock would poison it.)
        let recorded =
            (self.recording.lock().expect("recording lock").as_ref()).map(|r| (r.rows, r.ids));
        let recorded = recorded.map(|(rows, ptr)| {
            assert_eq!(rows, ids.len(), "a recorded step embeds its own ids");
            ptr
        });
        let uploaded = recorded
            .is_none()
            .then(|| self.upload_i32(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>()));
        let dev_ids = recorded.unwrap_or_else(|| uploaded.as_ref().expect("uploaded").ptr);
        let args = [
            ptr(out.ptr()),
            ptr(dev_ids),
            int(ids.len()),
            ptr(table.ptr),
            int(vocab_a),
            ptr(extra.map_or(0, |e| e.ptr)),
            int(vocab_b),
            int(table.cols),
            ptr(0),
        ];
        self.run("embed_bf16", (ids.len() as u32, 1, 1), 128, &args);
        Ok(out)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaWeight>) -> CudaTensor {
        assert_eq!(
            x.cols, w.cols,
            "linear: input width {} but weight [{}, {}]",
            x.cols, w.rows, w.cols
        );
        let (m, n, k) = (x.rows, w.rows, w.cols);
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "linear: bias of {} for {n} outputs", b.len());
        }
        let y = self.alloc(m, n);
        let epi = if bias.is_some() { EPI_BIAS } else { EPI_NONE };
        let args = [
            ptr(y.ptr()),
            ptr(x.ptr()),
            ptr(w.ptr),
            ptr(bias.map_or(0, |b| b.ptr)),
            ptr(0),
            int(m),
            int(n),
            int(k),
            int(n),
            Arg::I32(epi),
        ];
        let tiles = |t: usize| (n.div_ceil(t) as u32, m.div_ceil(t) as u32, 1);
        if m <= GEMV_MAX_ROWS {
            self.run(
                "gemv_bf16",
                (n.div_ceil(4) as u32, m.div_ceil(8) as u32, 1),
                256,
                &args,
            );
        } else if (m.div_ceil(128) * n.div_ceil(128)) < self.sm_count {
            // Too few large tiles to fill the GPU; the small tiles give bit-identical results.
            self.run("gemm_small_bf16", tiles(64), 128, &args);
        } else {
            self.run("gemm_bf16", tiles(128), 256, &args);
        }
        y
    }

    fn add_assign(&self, acc: &mut CudaTensor, x: &CudaTensor) {
        assert_eq!(
            (acc.rows, acc.cols),
            (x.rows, x.cols),
            "adding tensors of different shapes"
        );
        let args = [
            ptr(acc.ptr()),
            ptr(acc.ptr()),
            ptr(x.ptr()),
            int(acc.rows),
            int(acc.cols),
        ];
        self.run("add_bf16", Self::chunk_grid(acc.rows, acc.cols), 256, &args);
    }

    fn add_gated(&self, acc: &mut CudaTensor, x: &CudaTensor, alpha: &CudaWeight) {
        assert_eq!(
            (acc.rows, acc.cols),
            (x.rows, x.cols),
            "adding tensors of different shapes"
        );
        assert!(
            alpha.len() == 1 || alpha.len() == acc.cols,
            "gate of {} values for {} columns",
            alpha.len(),
            acc.cols
        );
        let args = [
            ptr(acc.ptr()),
            ptr(x.ptr()),
            ptr(alpha.ptr),
            int(alpha.len()),
            int(acc.rows),
            int(acc.cols),
        ];
        self.run(
            "tanh_gate_residual_bf16",
            Self::chunk_grid(acc.rows, acc.cols),
            256,
            &args,
        );
    }

    fn layer_norm(&self, x: &CudaTensor, w: &CudaWeight, b: &CudaWeight, eps: f32) -> CudaTensor {
        self.norm("layer_norm_bf16", x, w, Some(b), eps)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> CudaTensor {
        self.norm("rms_norm_bf16", x, w, None, eps)
    }

    fn activate(&self, x: &mut CudaTensor, act: Activation) {
        let args = [
            ptr(x.ptr()),
            ptr(x.ptr()),
            ptr(0),
            int(x.rows),
            int(x.cols),
            Arg::I32(activation_code(act)),
        ];
        self.run(
            "bias_act_bf16",
            Self::chunk_grid(x.rows, x.cols),
            256,
            &args,
        );
    }

    fn swiglu(&self, gate: &CudaTensor, up: &CudaTensor) -> CudaTensor {
        assert_eq!(
            (gate.rows, gate.cols),
            (up.rows, up.cols),
            "gate and up differ in shape"
        );
        let out = self.alloc(gate.rows, gate.cols);
        let args = [
            ptr(out.ptr()),
            ptr(gate.ptr()),
            ptr(up.ptr()),
            int(gate.rows),
            int(gate.cols),
        ];
        self.run(
            "silu_mul_bf16",
            Self::chunk_grid(gate.rows, gate.cols),
            256,
            &args,
        );
        out
    }

    fn rope(&self, x: &mut CudaTensor, head_dim: usize, layout: &CudaLayout, theta: f64) {
        assert_eq!(x.rows, layout.rows(), "RoPE rows do not match the step");
        assert!(
            head_dim % 2 == 0 && head_dim <= 512 && x.cols % head_dim == 0,
            "RoPE head_dim {head_dim} for width {}",
            x.cols
        );
        let args = [
            ptr(x.ptr()),
            ptr(0),
            ptr(layout.positions()),
            int(x.rows),
            int(x.cols / head_dim),
            int(0),
            int(head_dim),
            int(x.cols),
            int(0),
            float(theta as f32),
        ];
        self.run("rope_bf16", (x.rows as u32, 1, 1), 128, &args);
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
    ) -> CudaTensor {
        self.full_attention(q, k, v, heads)
    }

    fn paged_attention(
        &self,
        q: &CudaTensor,
        k_pool: &CudaTensor,
        v_pool: &CudaTensor,
        heads: usize,
        layout: &CudaLayout,
    ) -> CudaTensor {
        self.paged(q, k_pool, v_pool, heads, layout)
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
        self.gated_cross(q, k, v, heads, layout, per_image)
    }

    type StepGraphs = graph::StepGraphs;

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
        self.replay_or_record(graphs, ids, step, shape, rows, run)
    }

    fn sample(&self, logits: &CudaTensor, rows: &[RowSampling]) -> Result<Vec<u32>> {
        self.sample_rows(logits, rows)
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
        self.perceiver(q, [k_ctx, v_ctx, k_lat, v_lat], heads)
    }
}
