//! Timing on the GPU's own clock: CUDA events created with timing on (cudarc's `new_event(None)` turns it off) and
//! recorded on the backend's stream in order with its ops, so taking a [`Stamp`] never waits for the device. The
//! time between two stamps is read once both are reached (after a synchronise).
//!
//! Events come from a pool and go back to it when their stamp is dropped: a profile that stamps every op of every
//! step creates only as many events as it holds unresolved at once (one step's worth), not one pair per op run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};

pub struct EventPool {
    ctx: Arc<CudaContext>,
    free: Mutex<Vec<CudaEvent>>,
    created: AtomicUsize,
}

/// A point in a stream's work: when the device reached it. Returns its event to the pool when dropped.
pub struct Stamp {
    event: Option<CudaEvent>,
    pool: Arc<EventPool>,
}

impl EventPool {
    pub fn new(ctx: Arc<CudaContext>) -> Arc<EventPool> {
        Arc::new(EventPool {
            ctx,
            free: Mutex::new(Vec::new()),
            created: AtomicUsize::new(0),
        })
    }

    /// Records a stamp at the end of the work queued on `stream` so far. A failure is a device fault the
    /// Backend trait's timestamp cannot carry, so it panics like a failed launch.
    pub fn stamp(self: &Arc<Self>, stream: &CudaStream) -> Stamp {
        let reused = self.free.lock().expect("event pool lock").pop();
        let event = reused.unwrap_or_else(|| self.create());
        event
            .record(stream)
            .unwrap_or_else(|e| panic!("CUDA event record failed: {e}"));
        Stamp {
            event: Some(event),
            pool: self.clone(),
        }
    }

    fn create(&self) -> CudaEvent {
        self.created.fetch_add(1, Ordering::Relaxed);
        self.ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap_or_else(|e| panic!("CUDA event creation failed: {e}"))
    }

    /// Events created so far (each reused once its stamp is dropped).
    pub fn created(&self) -> usize {
        self.created.load(Ordering::Relaxed)
    }
}

impl Stamp {
    fn event(&self) -> &CudaEvent {
        self.event.as_ref().expect("a live stamp holds its event")
    }

    /// Microseconds from this stamp to `later` on the device's clock (waits until both are reached; the events'
    /// resolution is about half a microsecond).
    pub fn us_until(&self, later: &Stamp) -> f64 {
        let ms = self
            .event()
            .elapsed_ms(later.event())
            .unwrap_or_else(|e| panic!("CUDA event timing failed: {e}"));
        f64::from(ms) * 1e3
    }
}

impl Drop for Stamp {
    fn drop(&mut self) {
        // A poisoned pool (a panic elsewhere) just lets the event be destroyed: never panic in a drop.
        if let (Some(event), Ok(mut free)) = (self.event.take(), self.pool.free.lock()) {
            free.push(event);
        }
    }
}
