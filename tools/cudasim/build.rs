//! Builds the simulated CUDA device from `kernels/` (the single source of truth) and `sim/`:
//!
//! 1. copies every `kernels/*.cu` and `*.cuh` into `OUT_DIR/gen/`, with one mechanical change: each
//!    `__shared__ T a[N], b;` declaration becomes `SIM_SHARED(T, align, a, [N]); SIM_SHARED(T, align, b, );` on the
//!    same line (so line numbers hold; `#line` keeps the messages naming `kernels/<file>`), which binds the names to
//!    the running block's arena (`sim/cudasim.h`);
//! 2. preprocesses each kernel file to find its `extern "C"` kernels and their `__launch_bounds__`, and writes one
//!    translation unit per file and activation type (a file with `ACT_KERNEL`s is built as is, for bf16, and with
//!    `-DFE_ACT_F16`, as the engine compiles it): the file inside its own namespace (same-named helpers of two files
//!    must not merge at link time) plus a registration per kernel with its C signature and the hash of the sources.
//!    Both variants register under the file's name, so a module of the file holds the kernels of both;
//! 3. compiles and links `<variant>/lib64/libcuda.so.1` (the kernels, `sim/runtime.cpp`, `sim/driver.cpp`),
//!    `libnvrtc.so.13` (`sim/nvrtc.cpp`) and `libcublas.so.13` (`sim/cublas.cpp`).
//!
//! Variants: `fast` (always, -O2) and, when `CUDASIM_VARIANTS` lists them, `asan` and `tsan` (built with
//! `-fsanitize=address` / `thread`; `tools/cudasim/sanitize.sh` runs the GPU tests on them). Objects are cached in
//! `OUT_DIR` by a hash of their inputs and flags. The compiler is `$CUDASIM_CXX`, else `$CXX`, else `c++`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = root.join("../../kernels");
    let sim = root.join("sim");
    for dir in [&kernels, &sim, &root.join("include")] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    for var in ["CUDASIM_CXX", "CXX", "CUDASIM_VARIANTS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let cxx = std::env::var("CUDASIM_CXX")
        .or_else(|_| std::env::var("CXX"))
        .unwrap_or_else(|_| "c++".into());

    let gen = out.join("gen");
    std::fs::create_dir_all(&gen).expect("create OUT_DIR/gen");
    let sources = files(&kernels, "cu");
    let headers = files(&kernels, "cuh");
    let header_hash = headers.iter().fold(0u64, |h, p| {
        let name = file_name(p);
        h ^ fnv(&[name.as_bytes(), b"\0", read(p).as_bytes()])
    });
    for f in sources.iter().chain(&headers) {
        let text = rewrite_shared(&read(f), &file_name(f));
        std::fs::write(gen.join(file_name(f)), text).expect("write generated kernel file");
    }
    let mut units = Vec::new();
    for f in &sources {
        let name = file_name(f);
        let text = read(f);
        let hash = fnv(&[text.as_bytes()]) ^ header_hash;
        let variants: &[Option<&str>] = if text.contains("ACT_KERNEL(") { &[None, Some("f16")] } else { &[None] };
        for variant in variants {
            let kernels_found = extern_kernels(&cxx, &root, &gen, &name, *variant);
            let stem = name.trim_end_matches(".cu");
            let unit_name = variant.map_or_else(|| stem.to_string(), |v| format!("{stem}_{v}"));
            let unit = gen.join(format!("unit_{unit_name}.cpp"));
            std::fs::write(&unit, translation_unit(&name, &unit_name, *variant, hash, &kernels_found))
                .expect("write translation unit");
            units.push(unit);
        }
    }

    let mut variants = vec!["fast".to_string()];
    variants.extend(
        std::env::var("CUDASIM_VARIANTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty() && *v != "fast")
            .map(String::from),
    );
    for variant in &variants {
        build_variant(&cxx, &root, &gen, &out, variant, &units);
    }
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("read_dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name().expect("file name").to_string_lossy().to_string()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// 64-bit FNV-1a over the parts in order: the same hash `sim/nvrtc.cpp` computes from what NVRTC is given.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The file with every `__shared__` declaration bound to the block's arena, and a `#line` naming the original.
fn rewrite_shared(text: &str, name: &str) -> String {
    let mut out = format!("#line 1 \"kernels/{name}\"\n");
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        if !code.contains("__shared__") {
            out.push_str(line);
        } else {
            out.push_str(&shared_declaration(code).unwrap_or_else(|| {
                panic!("kernels/{name}:{}: a __shared__ declaration the simulator cannot read: {line}", n + 1)
            }));
        }
        out.push('\n');
    }
    out
}

/// `  __shared__ __align__(16) float a[N][M], b;` -> `SIM_SHARED(float, 16, a, [N][M]); SIM_SHARED(float, 16, b, );`
fn shared_declaration(code: &str) -> Option<String> {
    let rest = code.trim().strip_prefix("__shared__")?.trim_start();
    let (align, rest) = match rest.strip_prefix("__align__(") {
        Some(r) => {
            let close = r.find(')')?;
            (r[..close].trim().to_string(), r[close + 1..].trim_start())
        }
        None => ("0".to_string(), rest),
    };
    let rest = rest.trim_end().strip_suffix(';')?;
    let type_end = rest.find(char::is_whitespace)?;
    let (ty, declarators) = (&rest[..type_end], rest[type_end..].trim());
    let indent: String = code.chars().take_while(|c| c.is_whitespace()).collect();
    let mut out = indent;
    for d in declarators.split(',') {
        let d = d.trim();
        let (var, dims) = d.split_at(d.find('[').unwrap_or(d.len()));
        if var.is_empty() || !var.chars().all(|c| c.is_alphanumeric() || c == '_') {
            return None;
        }
        out.push_str(&format!("SIM_SHARED({ty}, {align}, {var}, {dims}); "));
    }
    Some(out)
}

struct ExternKernel {
    name: String,
    max_threads: String,
}

/// The `extern "C"` kernels of `gen/<file>` and their `__launch_bounds__` thread limits, read from the
/// preprocessed source (most are stamped out by macros).
/// `variant` `Some("f16")` reads the file as `-DFE_ACT_F16` compiles it.
fn extern_kernels(cxx: &str, root: &Path, gen: &Path, file: &str, variant: Option<&str>) -> Vec<ExternKernel> {
    let output = Command::new(cxx)
        .args(["-std=c++17", "-E", "-P", "-x", "c++", "-DFE_SIM"])
        .args(variant.map(activation_define))
        .arg("-I")
        .arg(root.join("include"))
        .arg("-I")
        .arg(root.join("sim"))
        .arg("-I")
        .arg(gen)
        .arg(gen.join(file))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cxx} (set CUDASIM_CXX to a C++17 compiler): {e}"));
    assert!(
        output.status.success(),
        "preprocessing kernels/{file}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let mut found = Vec::new();
    for decl in text.split("extern \"C\"").skip(1) {
        let Some(rest) = decl.trim_start().strip_prefix("__global__") else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix("void") else {
            continue;
        };
        let rest = rest.trim_start();
        let (max_threads, rest) = match rest.strip_prefix("__launch_bounds__") {
            Some(r) => {
                let close = r.find(')').expect("__launch_bounds__ closes");
                let args = r[..close].trim().trim_start_matches('(');
                (args.split(',').next().unwrap_or("0").trim().to_string(), &r[close + 1..])
            }
            None => ("0".to_string(), rest),
        };
        let name = rest.split('(').next().unwrap_or("").trim();
        if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
            found.push(ExternKernel { name: name.to_string(), max_threads });
        }
    }
    assert!(!found.is_empty(), "kernels/{file}: no extern \"C\" __global__ kernel found");
    found
}

/// The define of an activation variant: `f16` -> `-DFE_ACT_F16` (kernels/common.cuh).
fn activation_define(variant: &str) -> String {
    format!("-DFE_ACT_{}", variant.to_ascii_uppercase())
}

fn translation_unit(file: &str, unit_name: &str, variant: Option<&str>, hash: u64, kernels: &[ExternKernel]) -> String {
    let ns = format!("cudasim_{unit_name}");
    let define = variant.map_or_else(String::new, |v| format!("#define {}\n", &activation_define(v)[2..]));
    let mut s = format!(
        "// Generated by tools/cudasim/build.rs from kernels/{file}.\n{define}#include \"cudasim.h\"\n\
         #include \"cudasim_ptx.h\"\nnamespace {ns} {{\n#include \"{file}\"\n}}\n"
    );
    for (i, k) in kernels.iter().enumerate() {
        s.push_str(&format!(
            "static cudasim::Registration reg_{i}(cudasim::kernel_entry(\"{file}\", \"{name}\", 0x{hash:016x}ull, \
             (int)({max}), &{ns}::{name}));\n",
            name = k.name,
            max = k.max_threads
        ));
    }
    s
}

/// (flags of the kernels' translation units, flags of the runtime and driver, link flags) of a variant. Under TSan
/// the runtime is not instrumented: its own bookkeeping, shared by fibers that switch without synchronising, would
/// read as races. It tells TSan what it does on a thread's behalf itself (`CUDASIM_TSAN`).
fn variant_flags(variant: &str) -> (&'static [&'static str], &'static [&'static str], &'static [&'static str]) {
    const ASAN: &[&str] = &["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"];
    match variant {
        "fast" => (&["-O2"], &["-O2"], &["-O2"]),
        "asan" => (ASAN, ASAN, ASAN),
        "tsan" => (&["-O1", "-g", "-fsanitize=thread"], &["-O1", "-g", "-DCUDASIM_TSAN"], &["-fsanitize=thread"]),
        other => panic!("CUDASIM_VARIANTS: unknown variant {other} (fast, asan, tsan)"),
    }
}

/// Every compile's flags. CUDA code reads one type through a pointer to another (a uint4 as four bf16 pairs), which
/// nvcc allows and GCC's strict aliasing would optimise into garbage. A helper that calls itself or falls off its
/// end is an error: nvcc compiles either without a word, and GCC turns them into a silent infinite loop.
const BASE_FLAGS: &[&str] = &[
    "-std=c++17",
    "-fPIC",
    "-fvisibility=hidden",
    "-DFE_SIM",
    "-fno-strict-aliasing",
    "-Wno-unknown-pragmas",
    "-Werror=infinite-recursion",
    "-Werror=return-type",
];

/// One compile, skipped when an object of the same inputs and flags is already there.
fn compile(cxx: &str, includes: &[&Path], flags: &[&str], src: &Path, obj: &Path) -> Result<(), String> {
    let text = std::fs::read(src).map_err(|e| e.to_string())?;
    let sim_headers: Vec<String> = includes
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten())
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "h" || x == "cuh" || x == "cu"))
        .map(|p| read(&p))
        .collect();
    let mut parts: Vec<&[u8]> = vec![&text, cxx.as_bytes()];
    parts.extend(BASE_FLAGS.iter().chain(flags).map(|f| f.as_bytes()));
    parts.extend(sim_headers.iter().map(|h| h.as_bytes()));
    let key = format!("{:016x}", fnv(&parts));
    let stamp = obj.with_extension("key");
    if obj.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|k| k == key) {
        return Ok(());
    }
    let mut cmd = Command::new(cxx);
    cmd.args(BASE_FLAGS).arg("-c");
    cmd.args(flags);
    for i in includes {
        cmd.arg("-I").arg(i);
    }
    let output = cmd.arg(src).arg("-o").arg(obj).output().map_err(|e| format!("cannot run {cxx}: {e}"))?;
    if !output.status.success() {
        return Err(format!("{}: {}", src.display(), String::from_utf8_lossy(&output.stderr)));
    }
    std::fs::write(&stamp, key).map_err(|e| e.to_string())
}

fn build_variant(cxx: &str, root: &Path, gen: &Path, out: &Path, variant: &str, units: &[PathBuf]) {
    let (kernel_flags, runtime_flags, link_flags) = variant_flags(variant);
    let obj_dir = out.join(variant).join("obj");
    let lib_dir = out.join(variant).join("lib64");
    std::fs::create_dir_all(&obj_dir).expect("create object dir");
    std::fs::create_dir_all(&lib_dir).expect("create lib64");
    let sim = root.join("sim");
    let include = root.join("include");
    let includes: Vec<&Path> = vec![&include, &sim, gen];
    let mut jobs: Vec<PathBuf> = units.to_vec();
    jobs.extend(["runtime.cpp", "driver.cpp", "nvrtc.cpp", "cublas.cpp"].map(|f| sim.join(f)));
    let obj = |src: &Path| obj_dir.join(format!("{}.o", src.file_stem().expect("stem").to_string_lossy()));
    // Two compiles at a time: the machine has two cores and cargo builds other crates beside this one.
    let halves: Vec<Vec<PathBuf>> = jobs.chunks(jobs.len().div_ceil(2)).map(|c| c.to_vec()).collect();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = halves
            .iter()
            .map(|half| {
                let includes = &includes;
                let obj = &obj;
                s.spawn(move || {
                    half.iter().try_for_each(|src| {
                        let is_unit = src.starts_with(gen);
                        let flags = if is_unit { kernel_flags } else { runtime_flags };
                        compile(cxx, includes, flags, src, &obj(src))
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("compile thread")).collect()
    });
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        panic!("building the {variant} CUDA simulator failed:\n{e}");
    }
    let driver_objs: Vec<PathBuf> = units
        .iter()
        .map(|u| obj(u))
        .chain(["runtime.cpp", "driver.cpp"].map(|f| obj(&sim.join(f))))
        .collect();
    link(cxx, link_flags, &driver_objs, "libcuda.so.1", &lib_dir);
    link(cxx, link_flags, &[obj(&sim.join("nvrtc.cpp"))], "libnvrtc.so.13", &lib_dir);
    link(cxx, link_flags, &[obj(&sim.join("cublas.cpp"))], "libcublas.so.13", &lib_dir);
}

fn link(cxx: &str, flags: &[&str], objs: &[PathBuf], soname: &str, lib_dir: &Path) {
    let output = Command::new(cxx)
        .arg("-shared")
        .args(flags)
        .arg(format!("-Wl,-soname,{soname}"))
        .args(objs)
        .arg("-o")
        .arg(lib_dir.join(soname))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cxx}: {e}"));
    assert!(output.status.success(), "linking {soname}: {}", String::from_utf8_lossy(&output.stderr));
}
