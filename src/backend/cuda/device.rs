//! Finding CUDA devices without panicking: cudarc panics when it cannot open libcuda, so every path into the driver
//! starts here, behind `is_culib_present()`.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};

use crate::error::{Error, Result};

/// Whether the CUDA driver library can be opened (false on machines without an NVIDIA driver).
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

fn no_driver(device: &str) -> Error {
    Error::Device(
        device.into(),
        "no CUDA driver (libcuda.so.1 cannot be loaded): no CUDA device here".into(),
    )
}

/// The driver's CUDA version as `(major, minor)`.
pub fn driver_version() -> Result<(i32, i32)> {
    if !driver_present() {
        return Err(no_driver("cuda"));
    }
    let mut v = 0;
    // SAFETY: the library is present; `v` is valid for writes.
    let rc = unsafe { sys::cuDriverGetVersion(&mut v) };
    rc.result()
        .map_err(|e| Error::Device("cuda".into(), format!("cuDriverGetVersion: {e}")))?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// Number of CUDA devices (0 when the driver is missing or reports none).
pub fn device_count() -> usize {
    if !driver_present() || result::init().is_err() {
        return 0;
    }
    result::device::get_count().map_or(0, |n| n.max(0) as usize)
}

/// A context on device `ordinal`, with a typed error instead of cudarc's panic when there is no driver.
pub fn open(ordinal: usize) -> Result<Arc<CudaContext>> {
    let name = format!("cuda:{ordinal}");
    if !driver_present() {
        return Err(no_driver(&name));
    }
    let count = device_count();
    if ordinal >= count {
        return Err(Error::Device(
            name,
            format!("the driver reports {count} CUDA device(s)"),
        ));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| Error::Device(name, e.to_string()))?;
    // cudarc's event tracking orders its own `CudaSlice`s across streams, which the engine never uses (its memory is
    // its own pool, each backend runs one stream), and it synchronises the whole context when a context makes its
    // first stream: that synchronisation fails and invalidates any CUDA graph another backend in the process is
    // recording at that moment.
    // SAFETY: no `CudaSlice` is made from this context, so there is nothing for the tracking to order.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// One line per device: name, compute capability, memory.
pub fn describe(ctx: &CudaContext) -> String {
    let name = ctx
        .name()
        .unwrap_or_else(|e| format!("<name unavailable: {e}>"));
    let cc = ctx
        .compute_capability()
        .map_or("?".into(), |(a, b)| format!("{a}.{b}"));
    let mem = ctx.total_mem().map_or("?".into(), |m| {
        format!("{:.1} GiB", m as f64 / (1u64 << 30) as f64)
    });
    format!(
        "cuda:{} {name}, compute capability {cc}, {mem}",
        ctx.ordinal()
    )
}
