//! A simulated CUDA device for the engine's tests: the kernels of `kernels/` compiled for the CPU behind a stand-in
//! `libcuda.so.1` (with a stand-in NVRTC and cuBLAS beside it), built by this crate's `build.rs`. See
//! `tools/cudasim/README.md`.
//!
//! [`install`] makes the unchanged CUDA backend use it: it opens the simulated `libcuda.so.1` by full path, so the
//! dynamic loader answers cudarc's later open of `libcuda.so.1` by name with it, and points `CUDA_HOME` at the
//! simulator, where the backend looks for NVRTC and cuBLAS. Call it before anything opens a CUDA library, and only
//! where no real driver is present.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The folder holding `lib64/` of the variant `CUDASIM_VARIANT` names (`fast` when unset; `asan` and `tsan` exist
/// when the build had `CUDASIM_VARIANTS=asan,tsan`).
pub fn home() -> PathBuf {
    let variant = std::env::var("CUDASIM_VARIANT").unwrap_or_else(|_| "fast".into());
    PathBuf::from(env!("OUT_DIR")).join(variant)
}

/// Installs the simulated device for this process (once; later calls return the first result): `Ok` with the
/// simulator's folder, or why it could not be opened.
pub fn install() -> Result<PathBuf, String> {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let home = home();
            let driver = home.join("lib64/libcuda.so.1");
            // SAFETY: loads the simulator this crate built; its initialisers only register the kernels.
            let lib = unsafe { libloading::Library::new(&driver) }
                .map_err(|e| format!("{}: {e}", driver.display()))?;
            std::mem::forget(lib); // kept for the life of the process, as the real driver is
            // Read by the backend's library search (NVRTC, cuBLAS) from now on; set before any thread of ours
            // reads the environment.
            std::env::set_var("CUDA_HOME", &home);
            Ok(home)
        })
        .clone()
}
