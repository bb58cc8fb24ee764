//! Device memory: a caching pool for activations and per-step scratch, and a bump arena for weights.
//!
//! The model creates and drops tensors op by op, so activations come from a pool of freed buffers kept per size
//! class (four classes per power of two, so a buffer is at most 25% larger than asked): once one step has run,
//! the next step of the same shape finds every buffer it needs and makes no driver allocation. Buffers are
//! reused in stream order (one stream per backend), so a buffer handed back while a kernel still reads it is only
//! overwritten by work queued after that kernel. Nothing is returned to the driver before the backend is dropped.
//! `allocations()` counts driver allocations, so a test can assert that a warm decode step makes none.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys::CUdeviceptr, CudaContext};

/// Alignment of every buffer and weight (the kernels' 16-byte vector paths need 16; 256 matches cudaMalloc).
const ALIGN: usize = 256;

/// Buffers above this are long-lived (KV and media pools) and sized exactly rather than by class.
const EXACT_ABOVE: usize = 256 << 20;

pub struct Pool {
    ctx: Arc<CudaContext>,
    free: Mutex<HashMap<usize, Vec<CUdeviceptr>>>,
    /// Shared with sibling pools, so one count covers every driver allocation of a backend.
    allocations: Arc<AtomicUsize>,
}

/// A device buffer that goes back to its pool when dropped.
pub struct Buffer {
    pub ptr: CUdeviceptr,
    class: usize,
    pool: Arc<Pool>,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().expect("memory pool lock");
        free.entry(self.class).or_default().push(self.ptr);
    }
}

/// The bytes actually reserved for a request of `bytes`.
fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(ALIGN).next_multiple_of(ALIGN);
    if bytes > EXACT_ABOVE {
        return bytes;
    }
    let step = (bytes.next_power_of_two() / 8).max(ALIGN);
    bytes.next_multiple_of(step)
}

impl Pool {
    pub fn new(ctx: Arc<CudaContext>) -> Arc<Pool> {
        Arc::new(Pool {
            ctx,
            free: Mutex::new(HashMap::new()),
            allocations: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// A separate pool on the same context whose driver allocations count with this one's (a recorded step's
    /// private buffers).
    pub fn sibling(&self) -> Arc<Pool> {
        Arc::new(Pool {
            ctx: self.ctx.clone(),
            free: Mutex::new(HashMap::new()),
            allocations: self.allocations.clone(),
        })
    }

    /// Driver allocations made so far (pool misses and weight chunks).
    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::Relaxed)
    }

    /// A fresh driver allocation of `bytes`.
    pub fn malloc(&self, bytes: usize) -> CUdeviceptr {
        self.ctx.bind_to_thread().expect("binding the CUDA context");
        self.allocations.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the context is current; the pointer is freed in `Drop for Pool` / `Drop for WeightArena`.
        unsafe { result::malloc_sync(bytes) }
            .unwrap_or_else(|e| panic!("CUDA out of memory? allocating {bytes} bytes failed: {e}"))
    }

    /// A buffer of at least `bytes`, reused from the pool when one of its class is free.
    pub fn take(self: &Arc<Self>, bytes: usize) -> Buffer {
        let class = size_class(bytes);
        let reused = self
            .free
            .lock()
            .expect("memory pool lock")
            .get_mut(&class)
            .and_then(Vec::pop);
        let ptr = reused.unwrap_or_else(|| self.malloc(class));
        Buffer {
            ptr,
            class,
            pool: self.clone(),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        for ptr in self
            .free
            .get_mut()
            .expect("memory pool lock")
            .values()
            .flatten()
        {
            // SAFETY: every pointer came from `malloc` and no buffer refers to it any more (they hold the pool).
            let _ = unsafe { result::free_sync(*ptr) };
        }
    }
}

/// Weights: bump-allocated from one reservation when the caller sized it (`reserve`), else one allocation each.
pub struct WeightArena {
    pool: Arc<Pool>,
    chunks: Vec<CUdeviceptr>,
    base: CUdeviceptr,
    used: usize,
    capacity: usize,
}

impl WeightArena {
    pub fn new(pool: Arc<Pool>) -> Self {
        WeightArena {
            pool,
            chunks: Vec::new(),
            base: 0,
            used: 0,
            capacity: 0,
        }
    }

    /// Makes room for `bytes` of weights in one allocation (what a model's bf16 parameters need).
    pub fn reserve(&mut self, bytes: usize) {
        if bytes > self.capacity - self.used {
            self.base = self.pool.malloc(bytes.max(ALIGN));
            self.chunks.push(self.base);
            self.used = 0;
            self.capacity = bytes;
        }
    }

    pub fn take(&mut self, bytes: usize) -> CUdeviceptr {
        let bytes = bytes.max(1).next_multiple_of(ALIGN);
        if bytes > self.capacity - self.used {
            let ptr = self.pool.malloc(bytes);
            self.chunks.push(ptr);
            return ptr;
        }
        let ptr = self.base + self.used as u64;
        self.used += bytes;
        ptr
    }
}

impl Drop for WeightArena {
    fn drop(&mut self) {
        let _ = self.pool.ctx.bind_to_thread();
        for ptr in &self.chunks {
            // SAFETY: allocated by `Pool::malloc`; weights die with the backend that owns this arena.
            let _ = unsafe { result::free_sync(*ptr) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_by_at_most_a_quarter() {
        for bytes in [
            1,
            255,
            256,
            257,
            1000,
            4096,
            5000,
            1 << 20,
            (1 << 20) + 1,
            3 << 27,
            (256 << 20) + 3,
        ] {
            let c = size_class(bytes);
            assert!(c >= bytes && c % 256 == 0, "{bytes} -> {c}");
            assert!(
                c <= (bytes.max(256) * 5).div_ceil(4) + 256,
                "{bytes} -> {c}"
            );
        }
        assert_eq!(
            size_class(5000),
            size_class(5100),
            "nearby sizes share a class"
        );
    }
}
