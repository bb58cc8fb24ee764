//! CUDA backend op latency at IDEFICS-9B shapes (hidden 4096, 32 heads of 128): the linear layer at decode and
//! prefill sizes, paged attention (decode and prefill), gated cross-attention, RMSNorm. Each sample is timed on the
//! GPU's clock: CUDA events recorded on the stream around its iterations, read after one synchronise at the end,
//! so it is the device's time for the queued work (gaps included where the host launches slower than the GPU
//! runs). Every op in both kernel variants: groups `cuda_bf16` and `cuda_f16` (`--dtype`). Without a CUDA device
//! it prints a note and exits.
//! Run: `cargo bench --bench cuda_ops` (the device script runs it briefly).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{random_values, RandomWeights};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flamingo::backend::cuda::{device_count, ActDtype, CudaBackend, CudaTensor};
use flamingo::backend::{Backend, SeqStep, StepLayout};

const D: usize = 4096;
const HEADS: usize = 32;

/// Times `iters` runs of `op` between two CUDA events on the stream, read once the device has caught up.
fn timed<'a>(
    b: &'a CudaBackend,
    op: impl Fn() -> CudaTensor + 'a,
) -> impl FnMut(u64) -> Duration + 'a {
    move |iters| {
        let start = b.timestamp();
        for _ in 0..iters {
            drop(op());
        }
        let end = b.timestamp();
        b.synchronize();
        Duration::from_secs_f64(b.elapsed_us(&start, &end) * 1e-6)
    }
}

fn random(b: &CudaBackend, seed: u64, rows: usize, cols: usize) -> CudaTensor {
    b.from_host(random_values(seed, rows * cols), rows, cols)
}

/// `seqs` sequences of `kv_len` positions in 16-position blocks, each computing its last `q_rows` positions.
fn step(seqs: usize, kv_len: usize, q_rows: usize) -> StepLayout {
    let blocks = kv_len.div_ceil(16);
    StepLayout {
        block_size: 16,
        seqs: (0..seqs)
            .map(|s| SeqStep {
                q_rows,
                kv_len,
                block_table: (0..blocks).map(|j| (s * blocks + j) as u32).collect(),
                image_of_row: vec![(s % 4) as i32; q_rows],
                decode_from: if q_rows == 1 { kv_len - 1 } else { kv_len },
            })
            .collect(),
    }
}

fn ops(c: &mut Criterion) {
    if device_count() == 0 {
        eprintln!("skipped: no CUDA device");
        return;
    }
    for act in ActDtype::ALL {
        ops_in(c, act);
    }
}

fn ops_in(c: &mut Criterion, act: ActDtype) {
    let b = CudaBackend::with_activations(0, act).expect("CUDA backend on device 0");
    eprintln!("{}", b.summary());
    let w = RandomWeights::new(1, &[("w", &[D, D], true), ("norm", &[D], true)]);
    let (lin, norm) = (
        b.load_weight(&w.get("w")).unwrap(),
        b.load_weight(&w.get("norm")).unwrap(),
    );
    let mut g = c.benchmark_group(format!("cuda_{act}"));
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(10);

    for m in [1usize, 64, 512] {
        let x = random(&b, 2, m, D);
        g.throughput(Throughput::Bytes((D * D * 2) as u64));
        g.bench_function(format!("linear_m{m}_4096x4096"), |bench| {
            bench.iter_custom(timed(&b, || b.linear(&x, &lin, None)))
        });
    }
    g.throughput(Throughput::Elements((64 * D) as u64));
    let x = random(&b, 3, 64, D);
    g.bench_function("rms_norm_64x4096", |bench| {
        bench.iter_custom(timed(&b, || b.rms_norm(&x, &norm, 1e-6)))
    });

    for (name, seqs, kv, q_rows) in [
        ("paged_decode_32x1024", 32, 1024, 1),
        ("paged_prefill_1x1024", 1, 1024, 1024),
    ] {
        let layout = b.layout(&step(seqs, kv, q_rows));
        let pool_rows = seqs * kv.div_ceil(16) * 16;
        let (k, v) = (random(&b, 4, pool_rows, D), random(&b, 5, pool_rows, D));
        let q = random(&b, 6, seqs * q_rows, D);
        g.throughput(Throughput::Bytes((2 * seqs * kv * D * 2) as u64));
        g.bench_function(name, |bench| {
            bench.iter_custom(timed(&b, || b.paged_attention(&q, &k, &v, HEADS, &layout, None)))
        });
    }

    let layout = b.layout(&step(64, 1, 1));
    let (km, vm) = (random(&b, 7, 4 * 64, D), random(&b, 8, 4 * 64, D));
    let q = random(&b, 9, 64, D);
    g.throughput(Throughput::Elements(64));
    g.bench_function("cross_attention_64rows_4images", |bench| {
        bench.iter_custom(timed(&b, || {
            b.cross_attention(&q, &km, &vm, HEADS, &layout, 64)
        }))
    });
    g.finish();
}

criterion_group!(benches, ops);
criterion_main!(benches);
