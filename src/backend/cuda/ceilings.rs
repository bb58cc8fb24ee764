//! The GPU's measured ceilings: device-to-device copy bandwidth (`cuMemcpyDtoD` of 1 GiB, bytes read + written) and
//! bf16 matrix throughput of an 8192³ product. The build has no cuBLAS, so the product is this backend's own
//! tensor-core GEMM: a compute fraction is then relative to our kernel, not to the chip (cuBLAS reaches ~790 TFLOP/s
//! on an H200; `scripts/device-bench.sh` measures it beside ours).

use std::sync::Arc;
use std::time::Instant;

use super::CudaBackend;
use crate::backend::{Backend, Ceilings};
use crate::io::safetensors::{DType, WeightStore};

const COPY_ELEMS: usize = 512 << 20; // bf16: 1 GiB
const GEMM_N: usize = 8192;
const REPEATS: usize = 5;

pub fn measure(b: &CudaBackend) -> Ceilings {
    Ceilings {
        copy_bytes_per_s: copy_bandwidth(b),
        matmul_flops_per_s: gemm_flops(b),
        method: format!(
            "device-to-device copy of {} MiB, best of {REPEATS}; our bf16 GEMM {GEMM_N}^3 (no cuBLAS in the \
             build), best of {REPEATS}",
            COPY_ELEMS * 2 >> 20
        ),
    }
}

/// The fastest of `REPEATS` synchronised runs of `f`, after one warm-up run.
fn best_seconds(b: &CudaBackend, mut f: impl FnMut()) -> f64 {
    f();
    (0..REPEATS)
        .map(|_| {
            b.synchronize();
            let t = Instant::now();
            f();
            b.synchronize();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn copy_bandwidth(b: &CudaBackend) -> f64 {
    let (src, dst) = (b.alloc(1, COPY_ELEMS), b.alloc(1, COPY_ELEMS));
    let seconds = best_seconds(b, || b.dtod(dst.ptr(), src.ptr(), COPY_ELEMS));
    (2 * 2 * COPY_ELEMS) as f64 / seconds
}

fn gemm_flops(b: &CudaBackend) -> f64 {
    let n = GEMM_N;
    // Random-looking, never-zero values: a product of zeros runs faster than real data.
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
    let seconds = best_seconds(b, || drop(b.linear(&x, &w, None)));
    2.0 * (n * n * n) as f64 / seconds
}
