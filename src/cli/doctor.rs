//! `flamingo doctor`: what the CUDA backend would find on this machine, and whether every kernel compiles.
//! Also names the cuBLAS library the ceilings measure against and whether an NVTX tool is attached.
//! Works without a GPU or a driver (it then says so and still checks NVRTC); exits 0 only if every kernel file
//! compiles (and, where there are devices, loads on each).

use std::time::Instant;

use crate::backend::cuda::{self, kernels, nvrtc::Nvrtc, CudaBackend};
use crate::error::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// GPU architecture to compile the kernels for.
    #[arg(long, default_value = "sm_90")]
    arch: String,
}

pub fn run(args: DoctorArgs) -> Result<()> {
    match cuda::driver_version() {
        Ok((major, minor)) => println!("driver:   CUDA {major}.{minor}"),
        Err(Error::Device(_, why)) => println!("driver:   {why}"),
        Err(e) => println!("driver:   {e}"),
    }
    let devices = cuda::device_count();
    println!("devices:  {devices}");
    let mut failures = Vec::new();
    for n in 0..devices {
        match CudaBackend::new(n) {
            Ok(b) => println!("  {}: kernels loaded", b.summary()),
            Err(e) => {
                println!("  cuda:{n}: {e}");
                failures.push(format!("cuda:{n}"));
            }
        }
    }
    match kernels::NVCC {
        Some(v) => println!("prebuilt: sm_90 fatbins embedded ({v})"),
        None => {
            println!("prebuilt: none (built without nvcc; kernels compile with NVRTC at first use)")
        }
    }
    let nvrtc = match Nvrtc::load(kernels::HEADERS) {
        Ok(n) => n,
        Err(e) => {
            println!("nvrtc:    {e}");
            return Err(Error::Device(
                "nvrtc".into(),
                "NVRTC is needed to check the kernels".into(),
            ));
        }
    };
    println!(
        "nvrtc:    {}.{} ({})",
        nvrtc.version.0, nvrtc.version.1, nvrtc.library
    );
    match cuda::cublas_library() {
        Ok(lib) => println!("cublas:   {lib} (the matmul ceiling's yardstick)"),
        Err(why) => println!("cublas:   {why} (the matmul ceiling is our GEMM's)"),
    }
    println!("nvtx:     {}", crate::nvtx::status());
    println!("compiling every kernel file for {} with NVRTC, for bf16 and f16 activations:", args.arch);
    for (file, source) in kernels::SOURCES {
        for act in cuda::ActDtype::ALL {
            let start = Instant::now();
            match nvrtc.compile_uncached(file, source, &args.arch, act) {
                Ok(cubin) => println!(
                    "  ok    {file:<24} {act:<4} {:>6} ms  {:>7} bytes",
                    start.elapsed().as_millis(),
                    cubin.len()
                ),
                Err(e) => {
                    println!("  FAIL  {file:<24} {act:<4} {e}");
                    failures.push(format!("{file} ({act})"));
                }
            }
        }
    }
    if failures.is_empty() {
        println!("all {} kernel files compile", kernels::SOURCES.len());
        Ok(())
    } else {
        Err(Error::Device(
            "cuda".into(),
            format!("failed: {}", failures.join(", ")),
        ))
    }
}
