//! Build script. The CPU engine needs nothing generated; the CUDA backend will compile `kernels/*.cu` here (nvcc
//! when present) and embed their sources for NVRTC.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
