//! CPU backend latency: the matmul at IDEFICS-9B layer shapes (bf16 weights widened inside the op) and the
//! end-to-end stages of the bundled model (image encoding, prefill, one decode step).
//! Run: `cargo bench --bench cpu_model`.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flamingo::backend::cpu::CpuBackend;
use flamingo::backend::Backend;
use flamingo::io::safetensors::WeightStore;
use flamingo::runtime::generate::Pipeline;

/// A bf16 `[n, k]` weight in a temporary safetensors file, filled with a fixed non-zero pattern.
fn bf16_weight(dir: &std::path::Path, n: usize, k: usize) -> WeightStore {
    let data: Vec<u8> = (0..n * k)
        .flat_map(|i| half::bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) * 1e-3).to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![n, k], &data).unwrap();
    let path = dir.join(format!("w{n}x{k}.safetensors"));
    safetensors::serialize_to_file(vec![("w", view)], None, &path).unwrap();
    WeightStore::open_files(&[path], "bench".into()).unwrap()
}

fn linear(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let b = CpuBackend::new();
    let mut g = c.benchmark_group("cpu_linear_bf16");
    g.measurement_time(Duration::from_secs(3)).sample_size(10);
    // IDEFICS-9B's q_proj and gate_proj, at decode (M = 1) and a short prefill (M = 16).
    for &(n, k) in &[(4096usize, 4096usize), (11008, 4096)] {
        let store = bf16_weight(tmp.path(), n, k);
        let w = b.load_weight(&store.get("w", &[n, k]).unwrap()).unwrap();
        for &m in &[1usize, 16] {
            let x = b.from_host((0..m * k).map(|i| (i % 17) as f32 * 0.01).collect(), m, k);
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            g.bench_function(format!("m{m}_n{n}_k{k}"), |bench| {
                bench.iter(|| b.linear(&x, &w, None))
            });
        }
    }
    g.finish();
}

fn end_to_end(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo-model");
    let image = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/examples/shapes.png");
    let p = Pipeline::load(&dir, CpuBackend::new(), false).unwrap();
    let (prompt, pixels) = p
        .prepare(
            "User:<image>Describe this image.<end_of_utterance>\nAssistant:",
            &[image],
        )
        .unwrap();
    let b = &p.backend;
    let mut g = c.benchmark_group("cpu_bundled_model");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("encode_image", |bench| {
        bench.iter(|| p.encode_images(&pixels))
    });
    let media = p.encode_images(&pixels);
    g.bench_function("prefill", |bench| {
        bench.iter(|| p.prefill(&prompt, &media, 1).unwrap())
    });
    let seen = [*prompt.image_of_token.last().unwrap()];
    g.bench_function("decode_step", |bench| {
        bench.iter_batched(
            || p.prefill(&prompt, &media, 1).unwrap().0,
            |mut cache| {
                let h = p
                    .model
                    .forward(b, &[5], &seen, &media, &mut cache, None)
                    .unwrap();
                p.model.logits(b, &h)
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, linear, end_to_end);
criterion_main!(benches);
