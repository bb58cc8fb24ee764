//! The CUDA backend's state and what every op uses: the context, its one stream, the loaded kernels, the memory
//! pool and weight arena; the tensor types; allocation, copies and launches. The ops themselves are in `ops/`.

use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::device::{self, describe};
use super::kernels::{self, launch, Kernels};
use super::launchers::{ActDtype, Kernel};
use super::memory::{Buffer, Pool, WeightArena};
use super::timing;
use crate::error::{Error, Result};
use crate::io::safetensors::{DType, TensorRef};

/// An activation `[rows, cols]` on the device, of the backend's `ActDtype` (no buffer when empty).
pub struct CudaTensor {
    pub(in crate::backend::cuda) buf: Option<Buffer>,
    pub(in crate::backend::cuda) rows: usize,
    pub(in crate::backend::cuda) cols: usize,
}

impl CudaTensor {
    pub(in crate::backend::cuda) fn ptr(&self) -> u64 {
        self.buf.as_ref().map_or(0, |b| b.ptr)
    }

    /// Device address of row `r`.
    pub(in crate::backend::cuda) fn row(&self, r: usize) -> u64 {
        self.ptr() + (r * self.cols * 2) as u64
    }

    pub(in crate::backend::cuda) fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// A parameter `[rows, cols]` in the weight arena, of the backend's `ActDtype`.
pub struct CudaWeight {
    pub(in crate::backend::cuda) ptr: u64,
    pub(in crate::backend::cuda) rows: usize,
    pub(in crate::backend::cuda) cols: usize,
}

impl CudaWeight {
    pub(in crate::backend::cuda) fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// What the backend's ops consult while a step is being recorded.
pub(in crate::backend::cuda) struct Recording {
    /// Where every buffer of the step comes from.
    pub pool: Arc<Pool>,
    /// Device address of the step's token ids (int32) for the embedding.
    pub ids: u64,
    pub rows: usize,
    /// Why this recording cannot be replayed (an op did what a graph cannot repeat), if one did.
    pub spoiled: Option<String>,
}

/// The CUDA backend: one device context and stream, the kernels loaded on it, and the memory they work in.
pub struct CudaBackend {
    pub(in crate::backend::cuda) ctx: Arc<CudaContext>,
    pub(in crate::backend::cuda) stream: Arc<CudaStream>,
    pub(in crate::backend::cuda) kernels: Kernels,
    /// The type of activations, weights and the KV cache, which picks the kernels' variant.
    pub(in crate::backend::cuda) act: ActDtype,
    pub(in crate::backend::cuda) pool: Arc<Pool>,
    pub(in crate::backend::cuda) weights: Mutex<WeightArena>,
    pub(in crate::backend::cuda) events: Arc<timing::EventPool>,
    pub(in crate::backend::cuda) sm_count: usize,
    pub(in crate::backend::cuda) poison: bool,
    /// Set while a decode step is being recorded (see `graph.rs`).
    pub(in crate::backend::cuda) recording: Mutex<Option<Recording>>,
}

impl CudaBackend {
    /// A backend on CUDA device `ordinal` with bf16 activations: context, stream, and every kernel loaded.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_activations(ordinal, ActDtype::Bf16)
    }

    /// A backend on CUDA device `ordinal` whose activations, weights and KV cache are `act`.
    pub fn with_activations(ordinal: usize, act: ActDtype) -> Result<Self> {
        let ctx = device::open(ordinal)?;
        let err = |what: &str, e: cudarc::driver::DriverError| {
            Error::Device(format!("cuda:{ordinal}"), format!("{what}: {e}"))
        };
        let stream = ctx.new_stream().map_err(|e| err("creating a stream", e))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| err("multiprocessor count", e))? as usize;
        let kernels = Kernels::load(&ctx, act)?;
        let pool = Pool::new(ctx.clone());
        Ok(CudaBackend {
            weights: Mutex::new(WeightArena::new(pool.clone())),
            events: timing::EventPool::new(ctx.clone()),
            ctx,
            stream,
            kernels,
            act,
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
        format!("{}; {origin}; {} activations", describe(&self.ctx), self.act)
    }

    /// The type of activations, weights and the KV cache.
    pub fn activations(&self) -> ActDtype {
        self.act
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

    /// Reserves one device allocation for `bytes` of (16-bit) weights, which `load_weight` then fills in order.
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

    /// Queues kernel `k` on the stream with `grid` blocks of `block` threads.
    pub(in crate::backend::cuda) fn run(&self, k: &dyn Kernel, grid: (u32, u32, u32), block: u32) {
        launch(&self.kernels, &self.stream, k, self.act, grid, block);
    }

    pub(in crate::backend::cuda) fn check(
        &self,
        what: &str,
        r: std::result::Result<(), cudarc::driver::DriverError>,
    ) {
        r.unwrap_or_else(|e| panic!("CUDA {what} failed: {e}"));
    }

    pub(in crate::backend::cuda) fn bind(&self) {
        self.check("context binding", self.ctx.bind_to_thread());
    }

    /// Where buffers come from now: the private pool of the step being recorded (so a recorded graph's buffers
    /// are never handed to anything else), else the backend's pool.
    pub(in crate::backend::cuda) fn pool(&self) -> Arc<Pool> {
        match &*self.recording.lock().expect("recording lock") {
            Some(r) => r.pool.clone(),
            None => self.pool.clone(),
        }
    }

    /// A fresh (poisoned when asked) tensor.
    pub(in crate::backend::cuda) fn alloc(&self, rows: usize, cols: usize) -> CudaTensor {
        let n = rows * cols;
        let buf = (n > 0).then(|| self.pool().take(n * 2));
        let t = CudaTensor { buf, rows, cols };
        if self.poison && n > 0 {
            self.bind();
            // SAFETY: the buffer holds at least n 16-bit values.
            let nan = self.act.nan_bits();
            let rc = unsafe { sys::cuMemsetD16Async(t.ptr(), nan, n, self.stream.cu_stream()) };
            self.check("poison fill", rc.result());
        }
        t
    }

    /// A scratch buffer of `n` f32 values.
    pub(in crate::backend::cuda) fn scratch_f32(&self, n: usize) -> Buffer {
        self.pool().take(n.max(1) * 4)
    }

    /// `data` on the device, as the kernels' int32 arrays.
    pub(in crate::backend::cuda) fn upload_i32(&self, data: &[i32]) -> Buffer {
        let buf = self.pool().take(data.len().max(1) * 4);
        self.htod(buf.ptr, data);
        buf
    }

    pub(in crate::backend::cuda) fn htod<T>(&self, dst: u64, src: &[T]) {
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

    /// `n` f32 values from device address `src`, once the work queued so far has finished.
    pub(in crate::backend::cuda) fn dtoh_f32(&self, src: u64, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        self.bind();
        // SAFETY: src holds at least `n` f32 values (the callers' shapes); the stream is synchronised before
        // `out` is read.
        self.check("device-to-host copy", unsafe {
            result::memcpy_dtoh_async(&mut out, src, self.stream.cu_stream())
        });
        self.synchronize();
        out
    }

    pub(in crate::backend::cuda) fn dtod(&self, dst: u64, src: u64, elems: usize) {
        if elems == 0 {
            return;
        }
        self.bind();
        // SAFETY: both ranges hold `elems` 16-bit values (checked by the callers' shape asserts).
        self.check("device copy", unsafe {
            result::memcpy_dtod_async(dst, src, elems * 2, self.stream.cu_stream())
        });
    }

    /// Uploads a checkpoint tensor into the weight arena, converted to the activation type (rounded to nearest even
    /// like PyTorch's `.to()`; a stored type equal to it is copied as is). A finite value past f16's range is an
    /// error naming the tensor, not an infinity in the model.
    pub(in crate::backend::cuda) fn upload_weight(&self, t: &TensorRef, n: usize) -> Result<u64> {
        let data: std::borrow::Cow<[u8]> = match (t.dtype, self.act) {
            (DType::BF16, ActDtype::Bf16) | (DType::F16, ActDtype::F16) => t.bytes().into(),
            (DType::F32, _) => self.convert_weight(t, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))?.into(),
            (DType::F16, _) => self.convert_weight(t, 2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())?.into(),
            (DType::BF16, _) => self.convert_weight(t, 2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())?.into(),
        };
        if data.len() != n * 2 {
            return Err(Error::Invalid(format!(
                "{}: {} bytes of data for {n} values",
                t.name,
                t.bytes().len()
            )));
        }
        let dst = self.weights.lock().expect("weight arena lock").take(n * 2);
        self.htod(dst, &data);
        Ok(dst)
    }

    /// `t`'s values (each `width` bytes, read by `widen`) in the activation type, little-endian.
    fn convert_weight(&self, t: &TensorRef, width: usize, widen: fn(&[u8]) -> f32) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(t.bytes().len() / width * 2);
        for (i, b) in t.bytes().chunks_exact(width).enumerate() {
            let v = widen(b);
            let bits = self.act.encode(v);
            if v.is_finite() && self.act.decode(bits).is_infinite() {
                return Err(Error::Invalid(format!(
                    "{}: value {v} (element {i}) is past the range of {} activations; run with --dtype bf16",
                    t.name, self.act
                )));
            }
            out.extend_from_slice(&bits.to_le_bytes());
        }
        Ok(out)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Queued kernels may still read weights and modules that are freed right after this.
        let _ = self.stream.synchronize();
    }
}
