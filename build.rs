//! Build script: embeds the CUDA kernels.
//!
//! Always: every `kernels/*.cu` and `*.cuh` source goes into the binary, so the CUDA backend can compile them with
//! NVRTC at run time. When an nvcc is found (`$NVCC`, `$CUDA_HOME/bin/nvcc`, the CUDA 13.0 wheels that
//! `scripts/check-kernels.sh` installs under `.toolchain/cuda`, or `PATH`), each `.cu` is also compiled to a fatbin
//! holding an sm_90 cubin and compute_90 PTX, with the `-Xptxas -v` report saved next to it in `OUT_DIR`, and the
//! fatbins are embedded too (a file with `ACT_KERNEL`s once per activation type: as is for bf16, `-DFE_ACT_F16`
//! for f16); the runtime then needs no compiler on an sm_90 device. The build never fails for lack
//! of CUDA: without nvcc (or when it fails) only the sources are embedded, with a warning.
//! `FLAMINGO_NO_NVCC=1` skips nvcc on purpose (to exercise the NVRTC path).
//!
//! Also always: the Rust side of every kernel signature (`build/launchers.rs`), and the profiler's decorator from
//! the `Backend` trait (`build/profiled.rs`).

#[path = "build/launchers.rs"]
mod launchers;
#[path = "build/profiled.rs"]
mod profiled;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build/launchers.rs");
    println!("cargo:rerun-if-changed=build/profiled.rs");
    println!("cargo:rerun-if-changed=src/backend/mod.rs");
    println!("cargo:rerun-if-changed={}", kdir.display());
    for var in ["NVCC", "CUDA_HOME", "PATH", "FLAMINGO_NO_NVCC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let sources = kernel_files(&kdir, "cu");
    let headers = kernel_files(&kdir, "cuh");
    for f in sources.iter().chain(&headers) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fatbins = match find_nvcc(&root) {
        Some(nvcc) if std::env::var_os("FLAMINGO_NO_NVCC").is_none() => {
            compile_all(&nvcc, &kdir, &sources, &out)
        }
        _ => {
            println!("cargo:warning=no nvcc found: kernels are embedded as sources only (compiled by NVRTC at run time)");
            None
        }
    };
    std::fs::write(
        out.join("kernels.rs"),
        generated(&sources, &headers, fatbins.as_ref()),
    )
    .expect("write OUT_DIR/kernels.rs");
    let cu: Vec<&Path> = sources.iter().map(PathBuf::as_path).collect();
    std::fs::write(
        out.join("launchers.rs"),
        launchers::generate(&cu, &kdir.join("common.cuh")),
    )
    .expect("write OUT_DIR/launchers.rs");
    let backend_trait = root.join("src/backend/mod.rs");
    let source = std::fs::read_to_string(&backend_trait)
        .unwrap_or_else(|e| panic!("{}: {e}", backend_trait.display()));
    std::fs::write(out.join("profiled.rs"), profiled::generate(&source))
        .expect("write OUT_DIR/profiled.rs");
}

/// `kernels/*.<ext>`, sorted so the generated file is stable.
fn kernel_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("read kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let env_path = |var: &str| std::env::var_os(var).map(PathBuf::from);
    let path_dirs = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nvcc"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    env_path("NVCC")
        .into_iter()
        .chain(env_path("CUDA_HOME").map(|h| h.join("bin/nvcc")))
        .chain(Some(root.join(".toolchain/cuda/nvidia/cu13/bin/nvcc")))
        .chain(path_dirs)
        .find(|p| p.is_file())
}

/// The nvcc version line, and the fatbin of every (source, activation type); `None` (with a warning) if any
/// compile fails.
struct Fatbins {
    nvcc: String,
    files: Vec<Variant>,
}

/// One build of a kernel file: its source, activation type (`bf16`, `f16`) and, once compiled, fatbin.
#[derive(Clone)]
struct Variant {
    src: PathBuf,
    act: &'static str,
    fatbin: PathBuf,
}

/// The builds of every source: bf16, and f16 for a file with `ACT_KERNEL`s (kernels/common.cuh).
fn variants(sources: &[PathBuf], out: &Path) -> Vec<Variant> {
    let mut v = Vec::new();
    for src in sources {
        let text = std::fs::read_to_string(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let acts: &[&'static str] = if text.contains("ACT_KERNEL(") { &["bf16", "f16"] } else { &["bf16"] };
        let stem = src.file_stem().expect("kernel file name").to_string_lossy().to_string();
        for act in acts {
            v.push(Variant { src: src.clone(), act, fatbin: out.join(format!("{stem}.{act}.fatbin")) });
        }
    }
    v
}

fn compile_all(nvcc: &Path, kdir: &Path, sources: &[PathBuf], out: &Path) -> Option<Fatbins> {
    let version = Command::new(nvcc).arg("--version").output().ok()?;
    let nvcc_version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown version")
        .trim()
        .to_string();
    let builds = variants(sources, out);
    // Two files at a time at most: other builds share these cores.
    let results: Vec<Result<Variant, String>> = builds
        .chunks(builds.len().div_ceil(2).max(1))
        .map(|chunk| {
            let chunk = chunk.to_vec();
            let (nvcc, kdir) = (nvcc.to_path_buf(), kdir.to_path_buf());
            std::thread::spawn(move || {
                chunk
                    .iter()
                    .map(|v| compile_one(&nvcc, &kdir, v).map(|()| v.clone()))
                    .collect::<Vec<_>>()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|h| h.join().expect("nvcc thread panicked"))
        .collect();
    let mut files = Vec::new();
    for r in results {
        match r {
            Ok(f) => files.push(f),
            Err(e) => {
                println!("cargo:warning={e}; embedding kernel sources only (NVRTC at run time)");
                return None;
            }
        }
    }
    Some(Fatbins {
        nvcc: nvcc_version,
        files,
    })
}

/// `<name>.<act>.fatbin` (sm_90 SASS + compute_90 PTX) and `<name>.<act>.ptxas.txt` beside it.
fn compile_one(nvcc: &Path, kdir: &Path, v: &Variant) -> Result<(), String> {
    let src = &v.src;
    let name = format!(
        "{}.{}",
        src.file_stem().expect("kernel file name").to_string_lossy(),
        v.act
    );
    let text = std::fs::read_to_string(src).map_err(|e| format!("{}: {e}", src.display()))?;
    // wgmma / setmaxnreg only assemble for the arch-specific target (as in scripts/check-kernels.sh).
    let arch = if text.contains("wgmma") || text.contains("setmaxnreg") {
        "90a"
    } else {
        "90"
    };
    let fatbin = &v.fatbin;
    let output = Command::new(nvcc)
        .args(["--fatbin", "-std=c++17", "-O3", "-Xptxas", "-v"])
        .args((v.act == "f16").then_some("-DFE_ACT_F16"))
        .arg(format!(
            "-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]"
        ))
        .arg(format!("-I{}", kdir.display()))
        .arg("-o")
        .arg(fatbin)
        .arg(src)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let report = String::from_utf8_lossy(&output.stderr).to_string();
    std::fs::write(fatbin.with_extension("ptxas.txt"), &report).map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on {}: {}",
            src.display(),
            report.lines().take(5).collect::<Vec<_>>().join(" | ")
        ));
    }
    for line in report.lines().filter(|l| {
        l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")
    }) {
        println!("cargo:warning={name}: {}", line.trim());
    }
    Ok(())
}

fn generated(sources: &[PathBuf], headers: &[PathBuf], fatbins: Option<&Fatbins>) -> String {
    let name = |p: &Path| {
        p.file_name()
            .expect("file name")
            .to_string_lossy()
            .to_string()
    };
    let mut s = String::from("// Generated by build.rs.\n");
    let list = |s: &mut String, what: &str, files: &[PathBuf]| {
        writeln!(s, "pub const {what}: &[(&str, &str)] = &[").unwrap();
        for f in files {
            writeln!(
                s,
                "    ({:?}, include_str!({:?})),",
                name(f),
                f.display().to_string()
            )
            .unwrap();
        }
        s.push_str("];\n");
    };
    list(&mut s, "SOURCES", sources);
    list(&mut s, "HEADERS", headers);
    match fatbins {
        Some(fb) => {
            writeln!(s, "pub const NVCC: Option<&str> = Some({:?});", fb.nvcc).unwrap();
            s.push_str("/// (file, activation type, fatbin).\npub const FATBINS: &[(&str, &str, &[u8])] = &[\n");
            for v in &fb.files {
                writeln!(
                    s,
                    "    ({:?}, {:?}, include_bytes!({:?})),",
                    name(&v.src),
                    v.act,
                    v.fatbin.display().to_string()
                )
                .unwrap();
            }
            s.push_str("];\n");
        }
        None => s.push_str(
            "pub const NVCC: Option<&str> = None;\npub const FATBINS: &[(&str, &str, &[u8])] = &[];\n",
        ),
    }
    s
}
