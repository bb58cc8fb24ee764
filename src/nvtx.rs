//! NVTX ranges, so Nsight Systems (and `ncu --nvtx`) show the engine's phases, without the CUDA toolkit.
//!
//! NVTX v3 is header-only: an NVTX call does nothing until a tool asks for it. A tool that records ranges sets
//! `NVTX_INJECTION64_PATH` to its injection library before starting the program; the first NVTX call loads that
//! library, calls its `InitializeInjectionNvtx2` with a function that hands out the program's callback tables,
//! and the tool writes a function pointer into each table slot it handles (`nvtxDetail/nvtxInit.h` and
//! `nvtxImpl.h` in NVIDIA/NVTX). This module is that protocol in Rust: with the variable unset every range costs
//! one read of an initialised static; a library that cannot be loaded, lacks the entry point or refuses to attach
//! leaves the ranges off with one line on stderr, and never fails the program.
//!
//! Why not a crate: NVIDIA's `nvtx` 2.0 generates its bindings with bindgen, which needs libclang at build time
//! (absent here), and cudarc's `nvtx` feature opens `libnvToolsExt`, which CUDA 13 no longer ships.

use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, OnceLock};

/// The variable a 64-bit tool sets to its injection library.
pub const INJECTION_VAR: &str = "NVTX_INJECTION64_PATH";

/// Slot counts of the callback modules NVTX v3 defines, in module-id order from 1 (`NvtxCallbackModule`:
/// CORE, CUDA, OPENCL, CUDART, CORE2, SYNC; each count includes the unused slot 0). A tool asks for each.
const MODULE_SIZES: [usize; 6] = [16, 9, 15, 7, 16, 7];
/// `NVTX_CB_MODULE_CORE` and the slots of `nvtxRangePushA` and `nvtxRangePop` in it (`NvtxCallbackIdCore`).
const CORE: usize = 1;
const RANGE_PUSH_A: usize = 9;
const RANGE_POP: usize = 11;
/// `NvtxExportTableID`.
const ETID_CALLBACKS: u32 = 1;
const ETID_VERSIONINFO: u32 = 3;
const NVTX_VERSION: u32 = 3;

/// Whether a tool is attached, and which, or why not.
#[derive(Debug)]
pub enum Status {
    /// No tool asked for ranges: `NVTX_INJECTION64_PATH` is unset.
    Off,
    Attached(String),
    Failed(String),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Off => write!(f, "off (no tool attached: {INJECTION_VAR} is unset)"),
            Status::Attached(path) => write!(f, "attached to {path}"),
            Status::Failed(why) => write!(f, "off: {why}"),
        }
    }
}

/// One callback module: `slots[id]` holds the tool's function for call `id` (0 = not handled), and `table` is
/// what the tool receives, the address of each slot with null at both ends.
struct Module {
    slots: Box<[AtomicUsize]>,
    table: Box<[usize]>,
}

impl Module {
    fn new(size: usize) -> Module {
        let slots: Box<[AtomicUsize]> = (0..size).map(|_| AtomicUsize::new(0)).collect();
        let table = (0..=size)
            .map(|i| match i {
                0 => 0,
                i if i == size => 0,
                i => slots[i].as_ptr() as usize,
            })
            .collect();
        Module { slots, table }
    }
}

/// The program's callback tables, built when a tool is first loaded (the tool fills them while it attaches).
static MODULES: LazyLock<Vec<Module>> =
    LazyLock::new(|| MODULE_SIZES.iter().map(|&n| Module::new(n)).collect());

static STATUS: OnceLock<Status> = OnceLock::new();

/// The NVTX state of this process, attaching the tool named by `NVTX_INJECTION64_PATH` on first use.
pub fn status() -> &'static Status {
    STATUS.get_or_init(|| {
        let Some(path) = std::env::var_os(INJECTION_VAR) else {
            return Status::Off;
        };
        let path = path.to_string_lossy().to_string();
        match attach(&path) {
            Ok(()) => Status::Attached(path),
            Err(why) => {
                eprintln!("warning: NVTX ranges are off: {why}");
                Status::Failed(why)
            }
        }
    })
}

type InitializeInjection = unsafe extern "C" fn(extern "C" fn(u32) -> *const c_void) -> c_int;

/// Loads the injection library at `path` (kept loaded for the life of the process) and lets it attach.
fn attach(path: &str) -> Result<(), String> {
    // SAFETY: loading runs the library's initialisers; the user's tool named it to be loaded into this process.
    let library = unsafe { libloading::Library::new(path) }.map_err(|e| {
        format!(
            "{INJECTION_VAR}={path} cannot be loaded: {}",
            loader_error(&e)
        )
    })?;
    // SAFETY: the signature is NvtxInitializeInjectionNvtxFunc_t of nvtxTypes.h.
    let init = unsafe { library.get::<InitializeInjection>(b"InitializeInjectionNvtx2\0") }
        .map_err(|_| {
            format!("{INJECTION_VAR}={path} has no InitializeInjectionNvtx2: not an NVTX tool")
        })?;
    LazyLock::force(&MODULES);
    // SAFETY: the tool only calls back get_export_table and writes function pointers into the slots it is given.
    if unsafe { init(get_export_table) } == 0 {
        return Err(format!(
            "{INJECTION_VAR}={path}: InitializeInjectionNvtx2 refused to attach"
        ));
    }
    std::mem::forget(library);
    Ok(())
}

/// libloading's error with the loader's own message (`dlerror`), which it keeps as the error's source.
fn loader_error(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

#[repr(C)]
struct ExportCallbacks {
    struct_size: usize,
    get_module_function_table: extern "C" fn(c_int, *mut *const usize, *mut c_uint) -> c_int,
}

#[repr(C)]
struct ExportVersionInfo {
    struct_size: usize,
    version: u32,
    reserved0: u32,
    set_injection_nvtx_version: extern "C" fn(u32),
}

static CALLBACKS: ExportCallbacks = ExportCallbacks {
    struct_size: std::mem::size_of::<ExportCallbacks>(),
    get_module_function_table,
};

static VERSION_INFO: ExportVersionInfo = ExportVersionInfo {
    struct_size: std::mem::size_of::<ExportVersionInfo>(),
    version: NVTX_VERSION,
    reserved0: 0,
    set_injection_nvtx_version,
};

extern "C" fn get_export_table(id: u32) -> *const c_void {
    match id {
        ETID_CALLBACKS => &CALLBACKS as *const ExportCallbacks as *const c_void,
        ETID_VERSIONINFO => &VERSION_INFO as *const ExportVersionInfo as *const c_void,
        _ => std::ptr::null(),
    }
}

/// Hands the tool module `id`'s table and its slot count (`nvtxEtiGetModuleFunctionTable`); 0 for no such module.
extern "C" fn get_module_function_table(
    id: c_int,
    out_table: *mut *const usize,
    out_size: *mut c_uint,
) -> c_int {
    let Some(module) = usize::try_from(id)
        .ok()
        .filter(|&i| i >= 1)
        .and_then(|i| MODULES.get(i - 1))
    else {
        return 0;
    };
    // SAFETY: the tool passes valid pointers or null for the outputs it does not want.
    unsafe {
        if !out_size.is_null() {
            *out_size = (module.table.len() - 1) as c_uint;
        }
        if !out_table.is_null() {
            *out_table = module.table.as_ptr();
        }
    }
    1
}

/// Reserved by NVTX for tools to report their version; nothing to do with it.
extern "C" fn set_injection_nvtx_version(_version: u32) {}

/// The tool's function for core call `id`, if a tool is attached and handles it.
fn core_fn(id: usize) -> Option<usize> {
    match status() {
        Status::Attached(_) => {
            Some(MODULES[CORE - 1].slots[id].load(Ordering::Acquire)).filter(|&f| f != 0)
        }
        _ => None,
    }
}

/// An open NVTX range on this thread; dropping it ends the range.
#[must_use = "the range ends when this is dropped"]
pub struct Range {
    pushed: bool,
}

/// Opens a range named `label` on this thread's stack of ranges (nested ranges end in reverse order).
pub fn range(label: &str) -> Range {
    let Some(push) = core_fn(RANGE_PUSH_A) else {
        return Range { pushed: false };
    };
    let label = CString::new(label.replace('\0', " ")).expect("NULs replaced");
    // SAFETY: the slot holds the tool's nvtxRangePushA (int (*)(const char*)), as the tool attached it.
    let push =
        unsafe { std::mem::transmute::<usize, unsafe extern "C" fn(*const c_char) -> c_int>(push) };
    // SAFETY: `label` is a NUL-terminated string that outlives the call.
    unsafe { push(label.as_ptr()) };
    Range { pushed: true }
}

impl Drop for Range {
    fn drop(&mut self) {
        if let (true, Some(pop)) = (self.pushed, core_fn(RANGE_POP)) {
            // SAFETY: the slot holds the tool's nvtxRangePop (int (*)(void)).
            let pop = unsafe { std::mem::transmute::<usize, unsafe extern "C" fn() -> c_int>(pop) };
            // SAFETY: pops the range this value pushed.
            unsafe { pop() };
        }
    }
}
