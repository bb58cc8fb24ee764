//! Opening NVIDIA's run-time libraries without `LD_LIBRARY_PATH`. cudarc opens them by library name only
//! (`libnvrtc.so.13`, `libcublas.so.13`, ...) through the dynamic loader, and some open a sibling by name in turn
//! (NVRTC 13.0 its builtins, cuBLAS its cuBLASLt; neither has an RPATH). [`preload`] opens a library and those
//! siblings by full path from the first CUDA installation that has it ([`cuda_homes`]) and keeps them open: the
//! loader then answers the later by-name opens with the libraries already loaded. Where no installation has it,
//! whatever the loader finds (`LD_LIBRARY_PATH`, system paths) is used.

use std::path::{Path, PathBuf};

/// CUDA installations to look in, most specific first: `$CUDA_HOME`, `$CUDA_PATH`, the CUDA 13.0 wheels under
/// `.toolchain/cuda/nvidia/cu13` (`scripts/check-kernels.sh` installs them), `/usr/local/cuda`.
pub fn cuda_homes() -> Vec<PathBuf> {
    let wheels = ".toolchain/cuda/nvidia/cu13";
    let mut homes: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    homes.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(wheels));
    homes.push(PathBuf::from(wheels));
    homes.push(PathBuf::from("/usr/local/cuda"));
    homes.into_iter().filter(|h| h.is_dir()).collect()
}

/// The first file in `dir` whose name starts with `prefix` and does not contain `.alt.` (the wheels ship an
/// alternative build beside the main one).
fn find_lib(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            n.starts_with(prefix) && !n.contains(".alt.")
        })
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Opens `path` for the life of the process.
fn open_forever(path: &Path) -> bool {
    // SAFETY: loading a shared library runs its initialisers; these are NVIDIA's CUDA libraries.
    match unsafe { libloading::Library::new(path) } {
        Ok(l) => {
            std::mem::forget(l);
            true
        }
        Err(_) => false,
    }
}

/// Opens the library whose file name starts with `main` (e.g. `libcublas.so.`) from the `lib64` or `lib` folder
/// of the first of `homes` that has it, after the siblings it opens by name (`siblings`, prefixes as well) from
/// the same folder; returns the library's path.
pub fn preload(homes: &[PathBuf], siblings: &[&str], main: &str) -> Option<PathBuf> {
    for dir in homes
        .iter()
        .flat_map(|h| ["lib64", "lib"].map(|l| h.join(l)))
    {
        let Some(lib) = find_lib(&dir, main) else {
            continue;
        };
        for sibling in siblings.iter().filter_map(|s| find_lib(&dir, s)) {
            open_forever(&sibling);
        }
        if open_forever(&lib) {
            return Some(lib);
        }
    }
    None
}
