//! NVRTC: finding the library, compiling the embedded kernel sources to cubins, caching them on disk.
//!
//! cudarc opens NVRTC by library name only, and NVRTC 13.0 in turn opens `libnvrtc-builtins.so.13.0` by name, so
//! [`Nvrtc::load`] first opens both by full path from the first CUDA installation that has them ([`libs`]: no
//! `LD_LIBRARY_PATH` needed). The same installation's `include/` supplies `cuda_bf16.h`, the only header the
//! kernels include besides their own (which are passed to NVRTC from memory).

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::sys;

use super::launchers::ActDtype;
use super::libs;
use crate::error::{Error, Result};

/// Headers a kernel file may include, as `(name, source)`: the compiler sees them under these names.
pub type Headers = &'static [(&'static str, &'static str)];

/// A loaded NVRTC, the CUDA headers it compiles against and the project's own headers it embeds.
pub struct Nvrtc {
    pub version: (i32, i32),
    /// The library file opened, or a note that the dynamic loader found it.
    pub library: String,
    include_dir: Option<PathBuf>,
    headers: Headers,
}

fn device_error(what: impl Into<String>) -> Error {
    Error::Device("nvrtc".into(), what.into())
}

fn error_string(rc: sys::nvrtcResult) -> String {
    // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for every result code.
    unsafe { CStr::from_ptr(sys::nvrtcGetErrorString(rc)) }
        .to_string_lossy()
        .to_string()
}

fn check(rc: sys::nvrtcResult, what: &str) -> Result<()> {
    match rc {
        sys::nvrtcResult::NVRTC_SUCCESS => Ok(()),
        _ => Err(device_error(format!("{what}: {}", error_string(rc)))),
    }
}

impl Nvrtc {
    /// Opens NVRTC to compile kernel files that include `headers`.
    pub fn load(headers: Headers) -> Result<Nvrtc> {
        let homes = libs::cuda_homes();
        let preloaded = libs::preload(&homes, &["libnvrtc-builtins.so."], "libnvrtc.so.");
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(device_error(
                "libnvrtc not found: set CUDA_HOME to a CUDA 13 installation, or run scripts/check-kernels.sh \
                 (installs the CUDA 13.0 wheels into .toolchain/cuda)",
            ));
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is present (checked above); the pointers are valid for writes.
        check(
            unsafe { sys::nvrtcVersion(&mut major, &mut minor) },
            "nvrtcVersion",
        )?;
        let include_dir = homes
            .iter()
            .map(|h| h.join("include"))
            .find(|i| i.join("cuda_bf16.h").is_file());
        Ok(Nvrtc {
            version: (major, minor),
            library: match preloaded {
                Some(p) => p.display().to_string(),
                None => "found by the dynamic loader".into(),
            },
            include_dir,
            headers,
        })
    }

    fn options(&self, arch: &str, act: ActDtype) -> Vec<String> {
        let mut opts = vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()];
        opts.extend(act.defines().iter().map(|d| d.to_string()));
        if let Some(dir) = &self.include_dir {
            opts.push(format!("--include-path={}", dir.display()));
        }
        opts
    }

    /// Compiles one kernel file (with the embedded headers) to a cubin for `arch` (e.g. `sm_90`) in its variant for
    /// `act`, or reads it from the disk cache, which is keyed by the source, the headers, the options (the variant's
    /// among them) and the NVRTC version.
    pub fn cubin(&self, file: &str, source: &str, arch: &str, act: ActDtype) -> Result<Vec<u8>> {
        let opts = self.options(arch, act);
        let key = cache_key(
            &[source, &format!("{opts:?}{:?}", self.version)],
            self.headers,
        );
        let path = cache_dir().map(|d| {
            d.join(format!(
                "{}-{arch}-{key}.cubin",
                file.trim_end_matches(".cu")
            ))
        });
        if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
            return Ok(bytes);
        }
        let cubin = self.compile(file, source, &opts)?;
        if let Some(p) = path {
            // A cache that cannot be written only costs a recompile next time.
            let _ = p.parent().map(std::fs::create_dir_all);
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &cubin).is_ok() {
                let _ = std::fs::rename(&tmp, &p);
            }
        }
        Ok(cubin)
    }

    /// Compiles without the cache (what `flamingo doctor` and the NVRTC test check).
    pub fn compile_uncached(&self, file: &str, source: &str, arch: &str, act: ActDtype) -> Result<Vec<u8>> {
        self.compile(file, source, &self.options(arch, act))
    }

    fn compile(&self, file: &str, source: &str, opts: &[String]) -> Result<Vec<u8>> {
        let cstr = |s: &str| {
            CString::new(s).map_err(|_| device_error(format!("{file}: NUL byte in source")))
        };
        let src = cstr(source)?;
        let name = cstr(file)?;
        let header_src = self
            .headers
            .iter()
            .map(|(_, s)| cstr(s))
            .collect::<Result<Vec<_>>>()?;
        let header_names = self
            .headers
            .iter()
            .map(|(n, _)| cstr(n))
            .collect::<Result<Vec<_>>>()?;
        let hs: Vec<*const c_char> = header_src.iter().map(|c| c.as_ptr()).collect();
        let hn: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
        let opts = opts.iter().map(|o| cstr(o)).collect::<Result<Vec<_>>>()?;
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        // SAFETY: every pointer refers to a NUL-terminated string that outlives the program; counts match.
        unsafe {
            check(
                sys::nvrtcCreateProgram(
                    &mut prog,
                    src.as_ptr(),
                    name.as_ptr(),
                    hs.len() as i32,
                    hs.as_ptr(),
                    hn.as_ptr(),
                ),
                &format!("{file}: nvrtcCreateProgram"),
            )?;
            let rc = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
            let result = if rc == sys::nvrtcResult::NVRTC_SUCCESS {
                read_cubin(prog, file)
            } else {
                let log = program_log(prog);
                Err(device_error(format!(
                    "{file}: {}:\n{log}",
                    error_string(rc)
                )))
            };
            sys::nvrtcDestroyProgram(&mut prog);
            result
        }
    }
}

/// # Safety
/// `prog` must be a successfully compiled program.
unsafe fn read_cubin(prog: sys::nvrtcProgram, file: &str) -> Result<Vec<u8>> {
    let mut size = 0usize;
    check(
        sys::nvrtcGetCUBINSize(prog, &mut size),
        &format!("{file}: nvrtcGetCUBINSize"),
    )?;
    let mut buf = vec![0u8; size];
    check(
        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char),
        &format!("{file}: nvrtcGetCUBIN"),
    )?;
    Ok(buf)
}

/// # Safety
/// `prog` must be a live program.
unsafe fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    if sys::nvrtcGetProgramLogSize(prog, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char);
    String::from_utf8_lossy(&buf)
        .trim_end_matches('\0')
        .to_string()
}

/// `$FLAMINGO_CACHE_DIR`, else `$XDG_CACHE_HOME/flamingo/kernels`, else `~/.cache/flamingo/kernels`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FLAMINGO_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("flamingo/kernels"))
}

/// 128-bit FNV-1a (two 64-bit lanes with different offsets) of the parts and the headers, in hex: stable across
/// builds and Rust versions, unlike `std`'s hasher.
fn cache_key(parts: &[&str], headers: Headers) -> String {
    let mut lanes = [0xcbf2_9ce4_8422_2325u64, 0x6c62_272e_07bb_0142u64];
    let headers = headers.iter().flat_map(|(n, s)| [*n, *s]);
    for part in parts.iter().copied().chain(headers) {
        for b in part.bytes().chain([0xff]) {
            for lane in &mut lanes {
                *lane = (*lane ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    format!("{:016x}{:016x}", lanes[0], lanes[1])
}
