//! The embedded kernels (see `build.rs`), loaded into a context: the nvcc fatbins when the build had nvcc and the
//! device can run them, else cubins compiled by NVRTC for the device's architecture (cached on disk), each file in
//! the variant of the backend's activation type.
//! `FLAMINGO_KERNELS=nvrtc` forces the NVRTC path.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::launchers::{ActDtype, Arg, Kernel, KERNELS};
use super::nvrtc::Nvrtc;
use crate::error::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The embedded source of a kernel file.
pub fn source(file: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(n, _)| *n == file).map(|(_, s)| *s)
}

/// Where the loaded kernels came from, for `doctor` and logs.
#[derive(Clone, Debug)]
pub enum KernelOrigin {
    Nvcc(&'static str),
    Nvrtc { version: (i32, i32), arch: String },
}

pub struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
    pub origin: KernelOrigin,
}

fn device_error(ctx: &CudaContext, what: String) -> Error {
    Error::Device(format!("cuda:{}", ctx.ordinal()), what)
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>, act: ActDtype) -> Result<Kernels> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| device_error(ctx, format!("compute capability: {e}")))?;
        let force_nvrtc = std::env::var("FLAMINGO_KERNELS").is_ok_and(|v| v == "nvrtc");
        // The fatbins hold sm_90 SASS (and compute_90 PTX, which a newer GPU's driver can JIT). If the driver
        // refuses them, NVRTC compiles for the device instead, and the refusal is kept for the error should that
        // fail too.
        let mut fatbin_error = None;
        if let (Some(nvcc), false, true) = (NVCC, force_nvrtc, major >= 9) {
            let images = FATBINS
                .iter()
                .filter(|(_, variant, _)| *variant == act.name())
                .map(|(f, _, bin)| (*f, bin.to_vec()));
            match load_functions(ctx, act, images) {
                Ok(functions) => {
                    return Ok(Kernels {
                        functions,
                        origin: KernelOrigin::Nvcc(nvcc),
                    })
                }
                Err(e) => fatbin_error = Some(e),
            }
        }
        let with_fatbin_error = |e: Error| match (&fatbin_error, e) {
            (Some(fatbin), Error::Device(dev, why)) => Error::Device(
                dev,
                format!("{why} (after the nvcc fatbins failed: {fatbin})"),
            ),
            (_, e) => e,
        };
        let nvrtc = Nvrtc::load(HEADERS).map_err(with_fatbin_error)?;
        let arch = format!("sm_{major}{minor}");
        let images = KERNELS
            .iter()
            .map(|(file, _)| {
                let src = source(file).expect("every used kernel file is embedded");
                Ok((*file, nvrtc.cubin(file, src, &arch, act)?))
            })
            .collect::<Result<Vec<_>>>()
            .map_err(with_fatbin_error)?;
        let functions = load_functions(ctx, act, images.into_iter()).map_err(with_fatbin_error)?;
        Ok(Kernels {
            functions,
            origin: KernelOrigin::Nvrtc {
                version: nvrtc.version,
                arch,
            },
        })
    }

    pub fn get(&self, name: &str) -> &CudaFunction {
        self.functions
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} is not in the backend's kernel list"))
    }
}

/// The kernels of `file`'s variant for `act`.
fn kernels_of(file: &str, act: ActDtype) -> impl Iterator<Item = &'static str> + '_ {
    KERNELS
        .iter()
        .filter(move |(f, _)| *f == file)
        .flat_map(|(_, names)| names.iter())
        .filter(move |(_, variant)| variant.is_none_or(|v| v == act))
        .map(|(name, _)| *name)
}

/// Loads each `(file, image)` (built for `act`) and looks up the functions the backend uses from it.
fn load_functions(
    ctx: &Arc<CudaContext>,
    act: ActDtype,
    images: impl Iterator<Item = (&'static str, Vec<u8>)>,
) -> Result<HashMap<&'static str, CudaFunction>> {
    let mut functions = HashMap::new();
    for (file, image) in images {
        if !KERNELS.iter().any(|(f, _)| *f == file) {
            continue;
        }
        // The driver reads the image through its header: a fresh Vec is 16-byte aligned by the system allocator.
        let module = ctx
            .load_module(Ptx::from_binary(image))
            .map_err(|e| device_error(ctx, format!("loading {file}: {e}")))?;
        for name in kernels_of(file, act) {
            let f = module
                .load_function(name)
                .map_err(|e| device_error(ctx, format!("{file}: kernel {name}: {e}")))?;
            functions.insert(name, f);
        }
    }
    match KERNELS
        .iter()
        .flat_map(|(f, _)| kernels_of(f, act))
        .find(|n| !functions.contains_key(n))
    {
        Some(missing) => Err(device_error(
            ctx,
            format!("kernel {missing} was not loaded"),
        )),
        None => Ok(functions),
    }
}

/// Launches kernel `k` on `stream`. A failed launch is a device fault the op cannot report through the Backend
/// trait (its ops return tensors, not results), so it panics naming the kernel and the driver error.
pub fn launch(
    kernels: &Kernels,
    stream: &CudaStream,
    k: &dyn Kernel,
    act: ActDtype,
    grid: (u32, u32, u32),
    block: u32,
) {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return; // nothing to compute; a zero grid is an invalid launch
    }
    let name = k.name(act);
    let args = k.args();
    let f = kernels.get(name);
    let mut b = stream.launch_builder(f);
    for a in &args {
        match a {
            Arg::Ptr(p) => b.arg(p),
            Arg::I32(v) => b.arg(v),
            Arg::I64(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments are the kernel's parameters in order and type (generated from its signature); the
    // caller checked the buffers it passes against the shapes.
    unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("CUDA kernel {name} failed to launch: {e}"));
}

/// Grid for the grid-stride kernels: enough 256-thread blocks for `items`, capped as their headers say (an empty
/// grid, for no items, launches nothing).
pub fn stride_grid(items: usize) -> (u32, u32, u32) {
    (items.div_ceil(256).min(65535 * 8) as u32, 1, 1)
}
