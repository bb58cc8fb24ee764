//! The GPU's measured ceilings: device-to-device copy bandwidth (`cuMemcpyDtoD` of 1 GiB, bytes read + written) and
//! bf16 matrix throughput of an 8192³ product. The matmul ceiling is cuBLAS's GEMM when libcublas can be opened
//! (`cublas.rs`: what the chip does, ~790 TFLOP/s on an H200), with our own GEMM's rate on the same operands beside
//! it in the method; without cuBLAS it is our GEMM, and the method says so (fractions are then relative to our
//! kernel, not to the chip). Every run is timed with CUDA events on the backend's stream.

use std::sync::Arc;

use super::context::{CudaBackend, CudaTensor, CudaWeight};
use crate::backend::{Backend, Ceilings};
use crate::io::safetensors::{DType, WeightStore};

const REPEATS: usize = 5;

/// How much work the ceilings are measured on: what saturates an H200 by default ([`CeilingSizes::CHIP`]); less
/// where only the method is under test (a simulated device, a quick look).
#[derive(Clone, Copy, Debug)]
pub struct CeilingSizes {
    /// bf16 elements copied device to device.
    pub copy_elems: usize,
    /// N of the N³ bf16 product.
    pub gemm_n: usize,
}

impl CeilingSizes {
    pub const CHIP: CeilingSizes = CeilingSizes {
        copy_elems: 512 << 20, // 1 GiB
        gemm_n: 8192,
    };
}

pub fn measure(b: &CudaBackend, sizes: CeilingSizes) -> Ceilings {
    let CeilingSizes { copy_elems, gemm_n } = sizes;
    let copy = copy_bandwidth(b, copy_elems);
    let (x, w) = gemm_operands(b, gemm_n);
    let flops = 2.0 * (gemm_n * gemm_n * gemm_n) as f64;
    let ours = flops / best_seconds(b, || drop(b.linear(&x, &w, None)));
    let tflops = |f: f64| f / 1e12;
    let (matmul, how) = match b.cublas() {
        Ok(blas) => {
            let chip = flops / best_seconds(b, || drop(blas.linear(b, &x, &w)));
            let how = format!(
                "cuBLAS bf16 GEMM {gemm_n}^3 (f32 accumulate), best of {REPEATS}; our GEMM on the same operands \
                 {:.0} TFLOP/s = {:.2} of cuBLAS",
                tflops(ours),
                ours / chip
            );
            (chip, how)
        }
        Err(why) => {
            let how = format!(
                "our bf16 GEMM {gemm_n}^3, best of {REPEATS} (no cuBLAS yardstick: {why}; compute fractions are \
                 relative to our kernel, not to the chip)"
            );
            (ours, how)
        }
    };
    Ceilings {
        copy_bytes_per_s: copy,
        matmul_flops_per_s: matmul,
        method: format!(
            "device-to-device copy of {} MiB, best of {REPEATS}; {how}",
            (copy_elems * 2) >> 20
        ),
    }
}

/// The fastest of `REPEATS` runs of `f` on the device's clock (events around each run), after one warm-up run.
fn best_seconds(b: &CudaBackend, mut f: impl FnMut()) -> f64 {
    f();
    (0..REPEATS)
        .map(|_| {
            let start = b.timestamp();
            f();
            let end = b.timestamp();
            b.elapsed_us(&start, &end) * 1e-6
        })
        .fold(f64::INFINITY, f64::min)
}

fn copy_bandwidth(b: &CudaBackend, elems: usize) -> f64 {
    let (src, dst) = (b.alloc(1, elems), b.alloc(1, elems));
    let seconds = best_seconds(b, || b.dtod(dst.ptr(), src.ptr(), elems));
    (2 * 2 * elems) as f64 / seconds
}

/// `x` `[N, N]` and `w` `[N, N]`, bf16, random-looking and never zero: a product of zeros runs faster than real data.
fn gemm_operands(b: &CudaBackend, n: usize) -> (CudaTensor, CudaWeight) {
    let fill = |_: &str, _: DType, _: &[usize], out: &mut [u8]| {
        for (i, v) in out.chunks_exact_mut(2).enumerate() {
            let x = ((i.wrapping_mul(2_654_435_761) >> 7) % 2001) as f32 * 1e-3 - 1.0;
            v.copy_from_slice(&half::bf16::from_f32(x + 1e-3).to_le_bytes());
        }
    };
    let store = WeightStore::generated(
        vec![("w".into(), DType::BF16, vec![n, n])],
        "<gemm ceiling>".into(),
        Arc::new(fill),
    );
    let w = b
        .load_weight(&store.get("w", &[n, n]).expect("generated"))
        .expect("GEMM ceiling weight upload");
    let x = b.from_host(
        (0..n * n)
            .map(|i| ((i * 7919) % 2001) as f32 * 1e-3 - 0.999)
            .collect(),
        n,
        n,
    );
    (x, w)
}
