//! The GPU test executable: every op of the CUDA backend against the CPU oracle, batch invariance on the device,
//! the fixtures end to end, no device allocation in a warm decode step, and the profiling paths: CUDA-event
//! timestamps, `flamingo profile`'s per-op times on the device's clock, cuBLAS as the matmul ceiling's yardstick.
//!
//! Parity: fresh seeded random inputs (never zeros), rounded to bf16 first so both backends start from the same
//! values; every tensor the CUDA backend hands out is NaN-filled before its kernel writes it (`set_poison`), so an
//! unwritten element fails; sizes include 1, 7, 257 and 1000. Tolerance fit for bf16: max |gpu - cpu| under 1e-2 x
//! max |cpu|, and a NaN or infinity never passes (`common::assert_close`).
//!
//! Without a GPU every test runs on the simulated CUDA device (`tools/cudasim`), which runs the same kernels on the
//! CPU and checks what a GPU would not report (divergent collectives, deadlocks, shared-memory addresses, launch
//! geometry); the first test to open a device says which it got.

mod common;

use std::io::Write;
use std::time::Instant;

use common::{assert_close, greedy, one_row_seqs, prompt_or_decode, random_values, Fixture, RandomWeights, FIXTURES};
use flamingo::backend::cpu::{CpuBackend, CpuLayout, CpuTensor, CpuWeight};
use flamingo::backend::cuda::{
    cublas_library, device_count, ActDtype, CeilingSizes, CudaBackend, CudaLayout, CudaTensor, CudaWeight,
};
use flamingo::backend::{Backend, DecodeShape, RowSampling, SeqStep, StepLayout};
use flamingo::io::config::{Activation, Alibi, Llama3Scaling, RopeFrequencies};
use flamingo::model::sampling::SamplingParams;
use flamingo::perf::profile::{profile_steps, Profiled, Workload};
use flamingo::runtime::engine::{Engine, EngineConfig, Event};
use flamingo::runtime::pipeline::Pipeline;
use rand::{Rng, SeedableRng};

const TOL: f64 = 1e-2;

/// Where these tests run: the GPU when a CUDA driver reports one, else the simulated CUDA device
/// (`tools/cudasim`: the same kernels on the CPU behind a stand-in `libcuda.so.1`). Says which, once.
fn device() -> &'static str {
    static DEVICE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    DEVICE.get_or_init(|| {
        let where_ = if device_count() > 0 {
            "hardware"
        } else {
            let home = cudasim::install().expect("the simulated CUDA device (tools/cudasim)");
            assert!(
                device_count() > 0,
                "the simulated driver at {} reports no device",
                home.display()
            );
            "simulated"
        };
        let _ = writeln!(std::io::stderr(), "gpu tests on the {where_} CUDA device");
        where_
    })
}

/// The CUDA backend on device 0 with poisoned outputs (bf16, the default).
fn gpu() -> CudaBackend {
    gpu_with(ActDtype::Bf16)
}

/// The CUDA backend on device 0 with `act` activations and poisoned outputs.
fn gpu_with(act: ActDtype) -> CudaBackend {
    device();
    let mut b = CudaBackend::with_activations(0, act).expect("CUDA backend on device 0");
    b.set_poison(true);
    b
}

/// Runs a parity test on both kernel variants (bf16 and f16 activations: the `.cu` files built both ways), or on
/// those `GPU_TEST_DTYPES` lists (`bf16,f16`): the sanitizer runs (tools/cudasim/sanitize.sh) take bf16 alone, as
/// the f16 variant makes the same memory accesses and synchronisation (same element width, same code).
fn for_each_activation_type(test: fn(Pair)) {
    let acts: Vec<ActDtype> = match std::env::var("GPU_TEST_DTYPES") {
        Ok(list) => list
            .split(',')
            .map(|a| a.trim().parse().unwrap_or_else(|e| panic!("GPU_TEST_DTYPES: {e}")))
            .collect(),
        Err(_) => ActDtype::ALL.to_vec(),
    };
    for act in acts {
        test(Pair::with(act));
    }
}

/// Both backends, fed the same values.
struct Pair {
    cpu: CpuBackend,
    gpu: CudaBackend,
}

/// A tensor (weight, layout) on both backends.
type Tensors = (CpuTensor, CudaTensor);

impl Pair {
    fn with(act: ActDtype) -> Pair {
        Pair {
            cpu: CpuBackend::new(),
            gpu: gpu_with(act),
        }
    }

    /// Random values, rounded to the device's activation type so both backends start from the same ones.
    fn tensor(&self, seed: u64, rows: usize, cols: usize) -> Tensors {
        let act = self.gpu.activations();
        let v: Vec<f32> = random_values(seed, rows * cols)
            .into_iter()
            .map(|x| act.decode(act.encode(x)))
            .collect();
        (
            self.cpu.from_host(v.clone(), rows, cols),
            self.gpu.from_host(v, rows, cols),
        )
    }

    fn weight(&self, w: &RandomWeights, name: &str) -> (CpuWeight, CudaWeight) {
        (
            self.cpu.load_weight(&w.get(name)).unwrap(),
            self.gpu.load_weight(&w.get(name)).unwrap(),
        )
    }

    fn layout(&self, step: &StepLayout) -> (CpuLayout, CudaLayout) {
        (self.cpu.layout(step), self.gpu.layout(step))
    }

    /// Asserts the GPU result is within bf16 tolerance of the CPU result (f16 is finer still).
    fn check(&self, what: &str, t: &Tensors) {
        let what = format!("{what} ({})", self.gpu.activations());
        assert_eq!(self.cpu.dims(&t.0), self.gpu.dims(&t.1), "{what}: shape");
        let want: Vec<f64> = self.cpu.to_host(&t.0).into_iter().map(f64::from).collect();
        assert_close(&what, &self.gpu.to_host(&t.1), &want, TOL);
    }
}

#[test]
fn a_missing_device_is_a_typed_error_not_a_panic() {
    device();
    let ordinal = device_count(); // one past the last device, 0 when there is none
    match CudaBackend::new(ordinal) {
        Err(flamingo::Error::Device(name, why)) => {
            assert!(name.starts_with("cuda:") && !why.is_empty())
        }
        Err(e) => panic!("expected a device error, got {e}"),
        Ok(_) => panic!("cuda:{ordinal} should not exist"),
    }
}

/// A weight past f16's range is refused at upload, naming the tensor and the way out, instead of becoming an
/// infinity inside the model; bf16 (f32's range) takes the same tensor.
#[test]
fn a_weight_past_the_range_of_f16_is_refused_naming_it() {
    use flamingo::io::safetensors::{DType, WeightStore};
    let fill = |_: &str, _: DType, _: &[usize], out: &mut [u8]| {
        for (i, v) in out.chunks_exact_mut(4).enumerate() {
            v.copy_from_slice(&(if i == 5 { 70000.0f32 } else { 0.5 }).to_le_bytes());
        }
    };
    let store = WeightStore::generated(
        vec![("lm_head.weight".into(), DType::F32, vec![2, 4])],
        "<range test>".into(),
        std::sync::Arc::new(fill),
    );
    let t = store.get("lm_head.weight", &[2, 4]).unwrap();
    match gpu_with(ActDtype::F16).load_weight(&t) {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("lm_head.weight") && msg.contains("70000") && msg.contains("--dtype bf16"),
                "{msg}"
            );
        }
        Ok(_) => panic!("a weight of 70000 was uploaded as f16"),
    }
    let b = gpu();
    let w = b.load_weight(&t).expect("bf16 holds 70000");
    let back = b.to_host(&b.weight_to_tensor(&w));
    assert!((back[5] - 70000.0).abs() <= 70000.0 / 256.0, "bf16 gave {}", back[5]);
}

#[test]
fn linear_matches_cpu() {
    for_each_activation_type(linear_matches_cpu_with);
}

fn linear_matches_cpu_with(p: Pair) {
    // (M, N, K): GEMV (M <= 64), small-tile GEMM, large-tile GEMM (>= 132 tiles of 128), odd sizes everywhere.
    for (i, &(m, n, k)) in [
        (1, 7, 257),
        (7, 1000, 257),
        (64, 257, 1000),
        (257, 1000, 257),
        (1000, 3000, 264),
    ]
    .iter()
    .enumerate()
    {
        let w = RandomWeights::new(
            100 + i as u64,
            &[
                ("bf16", &[n, k], true),
                ("f32", &[n, k], false),
                ("bias", &[n], false),
            ],
        );
        let x = p.tensor(200 + i as u64, m, k);
        let bias = p.weight(&w, "bias");
        for name in ["bf16", "f32"] {
            let wt = p.weight(&w, name);
            p.check(
                &format!("linear {name} {m}x{n}x{k}"),
                &(
                    p.cpu.linear(&x.0, &wt.0, None),
                    p.gpu.linear(&x.1, &wt.1, None),
                ),
            );
            p.check(
                &format!("linear {name} + bias {m}x{n}x{k}"),
                &(
                    p.cpu.linear(&x.0, &wt.0, Some(&bias.0)),
                    p.gpu.linear(&x.1, &wt.1, Some(&bias.1)),
                ),
            );
        }
    }
}

#[test]
fn norms_and_elementwise_ops_match_cpu() {
    for_each_activation_type(norms_and_elementwise_ops_match_cpu_with);
}

fn norms_and_elementwise_ops_match_cpu_with(p: Pair) {
    for (i, &(rows, cols)) in [(1, 1000), (7, 257), (257, 7), (1000, 64)]
        .iter()
        .enumerate()
    {
        let s = 300 + 10 * i as u64;
        let w = RandomWeights::new(
            s,
            &[
                ("w", &[cols], false),
                ("b", &[cols], true),
                ("alpha", &[1], false),
                ("alpha_vec", &[1, 1, cols], false),
            ],
        );
        let (x, y) = (p.tensor(s + 1, rows, cols), p.tensor(s + 2, rows, cols));
        let (nw, nb) = (p.weight(&w, "w"), p.weight(&w, "b"));
        let tag = format!("[{rows}, {cols}]");
        p.check(
            &format!("rms_norm {tag}"),
            &(
                p.cpu.rms_norm(&x.0, &nw.0, 1e-6),
                p.gpu.rms_norm(&x.1, &nw.1, 1e-6),
            ),
        );
        p.check(
            &format!("layer_norm {tag}"),
            &(
                p.cpu.layer_norm(&x.0, &nw.0, &nb.0, 1e-5),
                p.gpu.layer_norm(&x.1, &nw.1, &nb.1, 1e-5),
            ),
        );
        p.check(
            &format!("swiglu {tag}"),
            &(p.cpu.swiglu(&x.0, &y.0), p.gpu.swiglu(&x.1, &y.1)),
        );
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::QuickGelu,
            Activation::Relu,
        ] {
            let mut t = p.tensor(s + 1, rows, cols);
            p.cpu.activate(&mut t.0, act);
            p.gpu.activate(&mut t.1, act);
            p.check(&format!("{act:?} {tag}"), &t);
        }
        let mut t = p.tensor(s + 1, rows, cols);
        p.cpu.add_assign(&mut t.0, &y.0);
        p.gpu.add_assign(&mut t.1, &y.1);
        p.check(&format!("add_assign {tag}"), &t);
        for gate in ["alpha", "alpha_vec"] {
            let a = p.weight(&w, gate);
            let mut t = p.tensor(s + 1, rows, cols);
            p.cpu.add_gated(&mut t.0, &y.0, &a.0);
            p.gpu.add_gated(&mut t.1, &y.1, &a.1);
            p.check(&format!("add_gated {gate} {tag}"), &t);
        }
    }
    // Per-head norms: a [T, H*d] tensor with a [d] weight.
    let w = RandomWeights::new(390, &[("head", &[40], true), ("hb", &[40], false)]);
    let x = p.tensor(391, 257, 5 * 40);
    let (hw, hb) = (p.weight(&w, "head"), p.weight(&w, "hb"));
    p.check(
        "rms_norm per head",
        &(
            p.cpu.rms_norm(&x.0, &hw.0, 1e-6),
            p.gpu.rms_norm(&x.1, &hw.1, 1e-6),
        ),
    );
    p.check(
        "layer_norm per head",
        &(
            p.cpu.layer_norm(&x.0, &hw.0, &hb.0, 1e-5),
            p.gpu.layer_norm(&x.1, &hw.1, &hb.1, 1e-5),
        ),
    );
}

#[test]
fn embedding_and_data_movement_match_cpu() {
    for_each_activation_type(embedding_and_data_movement_match_cpu_with);
}

fn embedding_and_data_movement_match_cpu_with(p: Pair) {
    let w = RandomWeights::new(
        400,
        &[
            ("table", &[1000, 257], true),
            ("extra", &[7, 257], false),
            ("vec", &[257], true),
        ],
    );
    let (table, extra) = (p.weight(&w, "table"), p.weight(&w, "extra"));
    let ids: Vec<u32> = (0..257u32).map(|i| (i * 389) % 1007).collect();
    let e = (
        p.cpu.embedding(&ids, &table.0, Some(&extra.0)).unwrap(),
        p.gpu.embedding(&ids, &table.1, Some(&extra.1)).unwrap(),
    );
    p.check("embedding", &e);
    assert!(
        p.gpu.embedding(&[1007], &table.1, Some(&extra.1)).is_err(),
        "an id past both tables is an error"
    );

    // Movement is exact: the GPU result must equal the CPU result bit for bit (inputs are bf16 values).
    let exact = |what: &str, t: &Tensors| {
        assert_eq!(p.gpu.to_host(&t.1), p.cpu.to_host(&t.0), "{what}");
    };
    let (a, b) = (p.tensor(401, 257, 7), p.tensor(402, 7, 7));
    let c = p.tensor(403, 257, 1000);
    exact("from_host/to_host", &p.tensor(401, 257, 7));
    exact(
        "slice_rows",
        &(
            p.cpu.slice_rows(&a.0, 3, 200),
            p.gpu.slice_rows(&a.1, 3, 200),
        ),
    );
    exact(
        "concat_rows",
        &(p.cpu.concat_rows(&a.0, &b.0), p.gpu.concat_rows(&a.1, &b.1)),
    );
    exact(
        "concat_cols",
        &(p.cpu.concat_cols(&a.0, &c.0), p.gpu.concat_cols(&a.1, &c.1)),
    );
    let rows = [256, 0, 7, 7, 100];
    exact(
        "gather_rows",
        &(
            p.cpu.gather_rows(&c.0, &rows),
            p.gpu.gather_rows(&c.1, &rows),
        ),
    );
    exact("zeros", &(p.cpu.zeros(7, 1000), p.gpu.zeros(7, 1000)));
    let v = p.weight(&w, "vec");
    exact(
        "weight_to_tensor",
        &(p.cpu.weight_to_tensor(&v.0), p.gpu.weight_to_tensor(&v.1)),
    );
    let mut d = p.tensor(404, 257, 7);
    p.cpu.write_rows(&mut d.0, 250, &b.0);
    p.gpu.write_rows(&mut d.1, 250, &b.1);
    exact("write_rows", &d);
    assert_eq!(p.gpu.dims(&p.gpu.zeros(0, 64)), (0, 64), "empty tensors");
}

#[test]
fn rope_matches_cpu() {
    for_each_activation_type(rope_matches_cpu_with);
}

fn rope_matches_cpu_with(p: Pair) {
    // Llama 3.2's scaling with a short original context, so that positions up to 1000 meet all three regimes.
    let llama3 = RopeFrequencies {
        theta: 500000.0,
        llama3: Some(Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        }),
        rotary_dims: None,
    };
    // GPT-NeoX's partial rotary (Pythia: rotary_pct 0.25 of 128; 0.5 of an odd-sized head of 24).
    let partial = |dims| RopeFrequencies { rotary_dims: Some(dims), ..RopeFrequencies::plain(10000.0) };
    // Query heads, key heads (fewer: GQA), head dim, frequencies.
    let cases = [
        (4, 2, 16, RopeFrequencies::plain(10000.0)),
        (3, 3, 64, RopeFrequencies::plain(10000.0)),
        (2, 1, 128, RopeFrequencies::plain(10000.0)),
        (4, 1, 16, llama3),
        (8, 2, 128, llama3),
        (4, 4, 128, partial(32)),
        (3, 3, 24, partial(12)),
        (2, 2, 12, partial(12)),
    ];
    for (i, &(heads, kv_heads, d, freqs)) in cases.iter().enumerate() {
        let step = one_row_seqs(0..257, |r| (r * 37) % 1000, |_| -1);
        let l = p.layout(&step);
        let mut q = p.tensor(500 + i as u64, 257, heads * d);
        let mut k = p.tensor(510 + i as u64, 257, kv_heads * d);
        p.cpu.rope(&mut q.0, &mut k.0, d, &l.0, &freqs);
        p.gpu.rope(&mut q.1, &mut k.1, d, &l.1, &freqs);
        p.check(&format!("rope q d={d} {freqs:?}"), &q);
        p.check(&format!("rope k d={d} {freqs:?}"), &k);
    }
}

#[test]
fn vision_attention_matches_cpu() {
    for_each_activation_type(vision_attention_matches_cpu_with);
}

fn vision_attention_matches_cpu_with(p: Pair) {
    // Head dims the kernels have (64, 80, 96, 128) and ones that run padded (12, 16); key/value heads fewer than
    // the queries' (GQA: Llama 3.2 Vision's cross-attention), and more keys than queries.
    let cases = [(4, 4, 12), (2, 2, 16), (3, 3, 64), (2, 2, 80), (2, 2, 96), (2, 2, 128), (4, 2, 16), (8, 2, 128)];
    for (i, &(heads, kv_heads, d)) in cases.iter().enumerate() {
        for (j, &(t, keys)) in [(1usize, 1usize), (7, 7), (257, 257), (9, 131)].iter().enumerate() {
            let s = 600 + 10 * i as u64 + 3 * j as u64;
            let (q, k, v) = (
                p.tensor(s, t, heads * d),
                p.tensor(s + 1, keys, kv_heads * d),
                p.tensor(s + 2, keys, kv_heads * d),
            );
            p.check(
                &format!("attention d={d} heads {heads}/{kv_heads} T={t} keys={keys}"),
                &(
                    p.cpu.attention(&q.0, &k.0, &v.0, heads),
                    p.gpu.attention(&q.1, &k.1, &v.1, heads),
                ),
            );
        }
    }
}

#[test]
fn cross_attention_matches_cpu() {
    for_each_activation_type(cross_attention_matches_cpu_with);
}

fn cross_attention_matches_cpu_with(p: Pair) {
    for (i, &(heads, d, per_image)) in [(4, 16, 7), (2, 64, 64), (3, 128, 257)].iter().enumerate() {
        let s = 700 + 10 * i as u64;
        let images = 3;
        let (km, vm) = (
            p.tensor(s, images * per_image, heads * d),
            p.tensor(s + 1, images * per_image, heads * d),
        );
        let q = p.tensor(s + 2, 257, heads * d);
        let l = p.layout(&one_row_seqs(0..257, |_| 0, |r| [0, 2, -1, 1][r % 4]));
        p.check(
            &format!("cross_attention d={d} per_image={per_image}"),
            &(
                p.cpu
                    .cross_attention(&q.0, &km.0, &vm.0, heads, &l.0, per_image),
                p.gpu
                    .cross_attention(&q.1, &km.1, &vm.1, heads, &l.1, per_image),
            ),
        );
    }
}

#[test]
fn resampler_attention_matches_cpu() {
    for_each_activation_type(resampler_attention_matches_cpu_with);
}

fn resampler_attention_matches_cpu_with(p: Pair) {
    for (i, &(heads, d, n_ctx, n_lat)) in [
        (2, 8, 7, 4),
        (3, 16, 257, 6),
        (2, 64, 257, 64),
        (16, 96, 257, 64),
        (2, 128, 1000, 7),
    ]
    .iter()
    .enumerate()
    {
        let s = 800 + 10 * i as u64;
        let q = p.tensor(s, n_lat, heads * d);
        let (kc, vc) = (
            p.tensor(s + 1, n_ctx, heads * d),
            p.tensor(s + 2, n_ctx, heads * d),
        );
        let (kl, vl) = (
            p.tensor(s + 3, n_lat, heads * d),
            p.tensor(s + 4, n_lat, heads * d),
        );
        p.check(
            &format!("resampler_attention d={d} ctx={n_ctx} lat={n_lat}"),
            &(
                p.cpu
                    .resampler_attention(&q.0, &kc.0, &vc.0, &kl.0, &vl.0, heads),
                p.gpu
                    .resampler_attention(&q.1, &kc.1, &vc.1, &kl.1, &vl.1, heads),
            ),
        );
    }
}

const BLOCK: usize = 16;

/// Sequences of the given lengths with shuffled block tables over one pool, and a layout writing all their
/// positions (for filling the pools with `write_kv`).
struct Paged {
    tables: Vec<Vec<u32>>,
    lens: Vec<usize>,
    pool_rows: usize,
}

impl Paged {
    fn new(lens: &[usize]) -> Paged {
        let blocks: usize = lens.iter().map(|l| l.div_ceil(BLOCK)).sum();
        // A fixed permutation of the blocks (7919 is prime, coprime with any block count it does not divide).
        let order: Vec<u32> = (0..blocks).map(|i| ((i * 7919) % blocks) as u32).collect();
        let mut next = order.into_iter();
        let tables = lens
            .iter()
            .map(|l| next.by_ref().take(l.div_ceil(BLOCK)).collect())
            .collect();
        Paged {
            tables,
            lens: lens.to_vec(),
            pool_rows: blocks * BLOCK,
        }
    }

    /// Sequence `s` computing its last `q_rows[s]` positions.
    fn step(&self, seqs: &[usize], q_rows: impl Fn(usize) -> usize) -> StepLayout {
        StepLayout {
            block_size: BLOCK,
            seqs: seqs
                .iter()
                .map(|&s| SeqStep {
                    q_rows: q_rows(s),
                    kv_len: self.lens[s],
                    block_table: self.tables[s].clone(),
                    image_of_row: vec![-1; q_rows(s)],
                    decode_from: prompt_or_decode(q_rows(s), self.lens[s]),
                })
                .collect(),
        }
    }

    fn all(&self) -> Vec<usize> {
        (0..self.lens.len()).collect()
    }

    /// K and V pools on both backends, every position of every sequence written through `write_kv`.
    fn pools(&self, p: &Pair, seed: u64, width: usize) -> [Tensors; 2] {
        let fill = self.step(&self.all(), |s| self.lens[s]);
        let l = p.layout(&fill);
        let total: usize = self.lens.iter().sum();
        [seed, seed + 1].map(|sd| {
            let rows = p.tensor(sd, total, width);
            let mut pool = (
                p.cpu.zeros(self.pool_rows, width),
                p.gpu.zeros(self.pool_rows, width),
            );
            p.cpu.write_kv(&mut pool.0, &l.0, &rows.0);
            p.gpu.write_kv(&mut pool.1, &l.1, &rows.1);
            pool
        })
    }
}

#[test]
fn paged_attention_matches_cpu() {
    for_each_activation_type(paged_attention_matches_cpu_with);
}

fn paged_attention_matches_cpu_with(p: Pair) {
    let paged = Paged::new(&[1, 7, 40, 257, 1000, 300]);
    // Decode rows, whole prompts and prompt chunks in one step; every head dim with a decode kernel (16, 32, 64,
    // 128) and one without (24: flash for every row, padded to 64); fewer kv heads than query heads (GQA).
    let q_rows = |s: usize| [1, 7, 1, 100, 1, 300][s];
    let cases = [(4, 4, 16), (3, 3, 24), (3, 3, 32), (2, 2, 64), (2, 2, 128), (4, 2, 16), (6, 2, 24), (8, 2, 128)];
    for (i, &(heads, kv_heads, d)) in cases.iter().enumerate() {
        let s = 900 + 10 * i as u64;
        let [k, v] = paged.pools(&p, s, kv_heads * d);
        p.check(&format!("write_kv d={d}"), &k);
        let step = paged.step(&paged.all(), q_rows);
        let q = p.tensor(s + 5, step.rows(), heads * d);
        let l = p.layout(&step);
        // ALiBi as transformers' MPT has it (slopes of the next power of two, interleaved) and as MosaicGPT does.
        let mpt = Alibi { n: heads.next_power_of_two(), bias_max: 8.0, interleave: !heads.is_power_of_two() };
        let mosaic = Alibi { n: heads, bias_max: 8.0, interleave: false };
        for alibi in [None, Some(mpt), Some(mosaic)] {
            p.check(
                &format!("paged_attention d={d} heads {heads}/{kv_heads} {alibi:?}"),
                &(
                    p.cpu.paged_attention(&q.0, &k.0, &v.0, heads, &l.0, alibi.as_ref()),
                    p.gpu.paged_attention(&q.1, &k.1, &v.1, heads, &l.1, alibi.as_ref()),
                ),
            );
        }
    }
}

/// Rows 5..8 and row 37 of `op(subset)` must equal, bit for bit, the same rows of `op(all 64)`.
/// How many values of `a` and `b` differ in any bit.
fn differing_bits(a: &[f32], b: &[f32]) -> usize {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

fn check_rows<B: Backend>(b: &B, what: &str, op: impl Fn(std::ops::Range<usize>) -> B::Tensor) {
    let full = b.to_host(&op(0..64));
    let width = full.len() / 64;
    for range in [5..8, 37..38] {
        let part = b.to_host(&op(range.clone()));
        let want = &full[range.start * width..range.end * width];
        let differ = differing_bits(&part, want);
        assert_eq!(
            differ, 0,
            "{what}: {differ} values of rows {range:?} differ from the batch of 64"
        );
    }
}

#[test]
fn rows_are_bit_identical_in_batches_of_1_3_and_64() {
    let b = gpu();
    let w = RandomWeights::new(
        1000,
        &[
            ("w", &[1000, 257], true),
            ("n", &[257], false),
            ("head", &[64], true),
        ],
    );
    let get = |n: &str| b.load_weight(&w.get(n)).unwrap();
    let (lin, nw) = (get("w"), get("n"));
    let rand = |seed, rows, cols| b.from_host(random_values(seed, rows * cols), rows, cols);
    let x = rand(1001, 64, 257);
    let rows = |r: std::ops::Range<usize>| b.slice_rows(&x, r.start, r.len());
    check_rows(&b, "linear (GEMV)", |r| b.linear(&rows(r), &lin, None));
    check_rows(&b, "rms_norm", |r| b.rms_norm(&rows(r), &nw, 1e-6));
    let (heads, d) = (4, 64);
    let q = rand(1002, 64, heads * d);
    let qr = |r: std::ops::Range<usize>| b.slice_rows(&q, r.start, r.len());
    check_rows(&b, "rope", |r| {
        let (mut t, mut k) = (qr(r.clone()), qr(r.clone()));
        let layout = b.layout(&one_row_seqs(r.clone(), |i| 3 * i + 1, |_| -1));
        b.rope(&mut t, &mut k, d, &layout, &RopeFrequencies::plain(10000.0));
        b.concat_cols(&t, &k)
    });
    let (km, vm) = (rand(1003, 3 * 7, heads * d), rand(1004, 3 * 7, heads * d));
    check_rows(&b, "cross_attention", |r| {
        let l = b.layout(&one_row_seqs(r.clone(), |_| 0, |i| [0, 2, -1, 1][i % 4]));
        b.cross_attention(&qr(r), &km, &vm, heads, &l, 7)
    });
    let (k, v) = (rand(1005, 257, heads * d), rand(1006, 257, heads * d));
    check_rows(&b, "vision attention", |r| {
        b.attention(&qr(r), &k, &v, heads)
    });
    // 64 decode sequences of different lengths over one paged pool.
    let lens: Vec<usize> = (0..64).map(|s| 1 + (s * 53) % 700).collect();
    let paged = Paged::new(&lens);
    let pool = |seed| rand(seed, paged.pool_rows, heads * d);
    let (kp, vp) = (pool(1007), pool(1008));
    check_rows(&b, "paged decode attention", |r| {
        let seqs: Vec<usize> = r.clone().collect();
        b.paged_attention(
            &qr(r),
            &kp,
            &vp,
            heads,
            &b.layout(&paged.step(&seqs, |_| 1)), None,
        )
    });
}

#[test]
fn fixtures_match_golden_logits_and_greedy_ids() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let p = Pipeline::load(&fx.dir, gpu(), false).unwrap();
        let (prompt, _) = p.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
        let h = p.prefill(&prompt, &fx.golden_pixels(), None).unwrap();
        let logits = p.backend.to_host(&p.logits(&h));
        let rel = assert_close(
            &format!("{name} logits"),
            &logits,
            &fx.get("logits").data,
            3e-2,
        );
        let want = fx.ids("generated_ids");
        let out = p
            .generate(&prompt, fx.golden_pixels(), &greedy(want.len()), |_| {})
            .unwrap();
        assert_eq!(
            out.generated_ids, want,
            "{name}: greedy ids (prompt logits error {rel:.2e} x max|ref|)"
        );
        let _ = writeln!(
            std::io::stderr(),
            "{name}: logits error {rel:.2e} x max|ref|, greedy ids equal"
        );
    }
}

/// Llama 3.2 Vision on the CUDA backend, end to end from the image files: prefill logits within 3e-2 of the
/// goldens and the greedy ids exact, on all three fixtures (bf16 weights and activations).
#[test]
fn mllama_fixtures_match_golden_logits_and_greedy_ids() {
    for name in ["tiny-mllama-a", "tiny-mllama-b", "tiny-mllama-c"] {
        let fx = Fixture::load(name);
        let p = Pipeline::load(&fx.dir, gpu(), false).unwrap();
        let (prompt, images) = p.prepare(&fx.meta.prompt_text, &fx.image_paths()).unwrap();
        assert_eq!(prompt.ids, fx.ids("input_ids"), "{name}: prompt ids");
        let h = p.prefill(&prompt, &images, None).unwrap();
        let logits = p.backend.to_host(&p.logits(&h));
        let rel = assert_close(&format!("{name} logits"), &logits, &fx.get("logits").data, 3e-2);
        let want = fx.ids("generated_ids");
        let out = p.generate(&prompt, images, &greedy(want.len()), |_| {}).unwrap();
        assert_eq!(out.generated_ids, want, "{name}: greedy ids (prompt logits error {rel:.2e} x max|ref|)");
        let _ = writeln!(std::io::stderr(), "{name}: logits error {rel:.2e} x max|ref|, greedy ids equal");
    }
}

/// OpenFlamingo's three fixtures on the device with `--dtype f16`: the folder through `Pipeline` (its parts, tokenizer
/// and open_clip preprocessing) and the golden prompt from its text; the images from their files; greedy decoding
/// (ALiBi, partial rotary, QuickGELU, the gated blocks and the resampler all in the kernels' f16 variant). Issue
/// 21's bound: the prompt's logits within 3e-2 x max|ref| and every greedy id equal. f16 is what meets it: with bf16
/// activations the logits are 1.6e-2 (a), 2.2e-2 (b) and 3.8e-2 (c) off and a's 4th greedy id flips (OpenFlamingo's
/// own margin there is 0.12); the CPU with its values rounded to f16 after every op is 1.6e-3, 2.0e-3 and 5.7e-3
/// off, to bf16 3.0e-2, 9.8e-3 and 2.4e-2.
///
/// Each fixture is driven step by step as the engine drives a model (`common::openflamingo::run_whole_model`: media
/// cache written once per image, paged KV cache, prefill then decode steps), which gives the prompt's logits and the
/// greedy ids from one pass: `generate` after a prefill would run the vision tower and the prompt's LM-head GEMVs
/// twice, a minute or more per fixture on the simulated device. One test per fixture, so each says which failed.
#[test]
fn openflamingo_a_in_f16_matches_golden_logits_and_greedy_ids() {
    openflamingo_fixture_in_f16_matches_golden("tiny-openflamingo-a");
}

#[test]
fn openflamingo_b_in_f16_matches_golden_logits_and_greedy_ids() {
    openflamingo_fixture_in_f16_matches_golden("tiny-openflamingo-b");
}

#[test]
fn openflamingo_c_in_f16_matches_golden_logits_and_greedy_ids() {
    openflamingo_fixture_in_f16_matches_golden("tiny-openflamingo-c");
}

fn openflamingo_fixture_in_f16_matches_golden(name: &str) {
    let fx = Fixture::load(name);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.dir.join("golden.json")).unwrap()).unwrap();
    let p = Pipeline::load(&fx.dir, gpu_with(ActDtype::F16), false).unwrap();
    let images = common::openflamingo::image_files(name);
    let (prompt, pixels) = p.prepare(meta["prompt"].as_str().unwrap(), &images).unwrap();
    assert_eq!(prompt.ids, fx.ids("input_ids"), "{name}: prompt ids");
    assert_eq!(pixels.len(), images.len(), "{name}: images");
    let run = common::openflamingo::run_whole_model(&p.backend, name);
    let rel = assert_close(&format!("{name} logits (f16)"), &run.logits, &fx.get("logits").data, 3e-2);
    let (got, want) = (run.greedy_ids, fx.ids("generated_ids"));
    assert_eq!(got, want, "{name}: greedy ids (f16; prompt logits error {rel:.2e} x max|ref|)");
    let _ = writeln!(
        std::io::stderr(),
        "{name} (f16): logits error {rel:.2e} x max|ref|, all {} greedy ids equal",
        got.len()
    );
}

#[test]
fn warm_decode_steps_make_no_device_allocation() {
    let b = gpu();
    let fx = Fixture::load("tiny-idefics-a");
    let p = Pipeline::load(&fx.dir, b, false).unwrap();
    let (prompt, _) = p.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
    let config = EngineConfig {
        block_size: BLOCK,
        kv_blocks: 8,
        media_slots: 2,
        max_seqs: 2,
        max_step_tokens: 256,
        decode_graphs: true,
        prefix_cache: true,
    };
    let mut engine = Engine::new(&p, config).unwrap();
    // The golden continuation has 8 tokens and no end-of-sequence: step 1 is the prefill, 2..8 decode.
    engine
        .add_request(prompt, fx.golden_pixels(), &greedy(8))
        .unwrap();
    for _ in 0..3 {
        engine.step().unwrap();
    }
    let before = p.backend.device_allocations();
    for _ in 0..4 {
        engine.step().unwrap();
        assert_eq!(engine.running_requests(), 1, "the request ended early");
    }
    assert_eq!(
        p.backend.device_allocations(),
        before,
        "device allocations in warm decode steps"
    );
    assert!(
        engine.stats().recorded_steps >= 4,
        "the decode steps ran from a CUDA graph"
    );
}

/// Random rules over random logits (flat rows and peaked ones, x10), on both backends. The GPU sums probabilities in
/// tiles and with `__expf`, the CPU left to right: a row is compared only where nudging its draw by 1e-4 does not
/// change the CPU's token (the draw is not within rounding of a boundary between two tokens), and most rows must be
/// such rows. A row with everything banned is an error on both.
#[test]
fn sampling_matches_cpu() {
    for_each_activation_type(sampling_matches_cpu_with);
}

fn sampling_matches_cpu_with(p: Pair) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    let act = p.gpu.activations();
    for (i, &vocab) in [1usize, 7, 1000, 32003].iter().enumerate() {
        let rows = 60;
        let values: Vec<f32> = random_values(900 + i as u64, rows * vocab)
            .chunks(vocab)
            .enumerate()
            .flat_map(|(r, row)| row.iter().map(move |&x| x * [1.0, 10.0][r % 2]))
            .map(|x| act.decode(act.encode(x)))
            .collect();
        let logits = (
            p.cpu.from_host(values.clone(), rows, vocab),
            p.gpu.from_host(values, rows, vocab),
        );
        // Id 0 is never banned, so every row keeps a token (ids past the vocabulary are ignored).
        let ids = |n: usize, first: u32, rng: &mut rand::rngs::StdRng| -> Vec<u32> {
            let mut v: Vec<u32> = (0..n)
                .map(|_| rng.random_range(first..vocab as u32 + 2))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let lists: Vec<(Vec<u32>, Vec<u32>, Vec<(u32, f32)>)> = (0..rows)
            .map(|_| {
                let offsets = ids(12, 0, &mut rng)
                    .into_iter()
                    .map(|id| (id, rng.random_range(-3.0..3.0)))
                    .collect();
                (ids(3, 1, &mut rng), ids(20, 0, &mut rng), offsets)
            })
            .collect();
        let rules: Vec<RowSampling> = lists
            .iter()
            .enumerate()
            .map(|(r, (banned, seen, offsets))| RowSampling {
                temperature: [0.0, 0.7, 1.0, 1.3][r % 4],
                top_k: [0, 1, 5, 50, 0][r % 5],
                top_p: [1.0, 0.9, 0.5, 1e-8][r / 4 % 4],
                repetition_penalty: [1.0, 1.2][r % 2],
                banned: if r % 7 == 6 { &[] } else { banned },
                seen,
                logit_offsets: if r % 3 == 1 { &[] } else { offsets },
                uniform: rng.random::<f32>(),
                logprobs: [None, Some(0), Some(5), Some(20)][r % 4],
            })
            .collect();
        let gpu = p.gpu.sample(&logits.1, &rules).unwrap();
        let cpu = p.cpu.sample(&logits.0, &rules).unwrap();
        let mut compared = 0;
        for r in 0..rows {
            let nudged = |d: f32| {
                let rule = RowSampling {
                    uniform: (rules[r].uniform + d).clamp(0.0, 0.999),
                    ..rules[r]
                };
                p.cpu
                    .sample(&p.cpu.slice_rows(&logits.0, r, 1), &[rule])
                    .unwrap()
                    .remove(0)
                    .token
            };
            if nudged(1e-4) == cpu[r].token && nudged(-1e-4) == cpu[r].token {
                assert_eq!(gpu[r], cpu[r], "vocab {vocab} row {r}: {:?}", rules[r]);
                compared += 1;
            }
        }
        assert!(
            compared * 4 >= rows * 3,
            "vocab {vocab}: only {compared} of {rows} rows compared"
        );
        let everything: Vec<u32> = (0..vocab as u32).collect();
        for temperature in [0.0, 0.8] {
            let all_banned = RowSampling {
                banned: &everything,
                ..rules[1]
            };
            let rule = [RowSampling {
                temperature,
                ..all_banned
            }];
            assert!(p
                .cpu
                .sample(&p.cpu.slice_rows(&logits.0, 0, 1), &rule)
                .is_err());
            assert!(p
                .gpu
                .sample(&p.gpu.slice_rows(&logits.1, 0, 1), &rule)
                .is_err());
        }
    }
}

/// Decode steps replayed from CUDA graphs (padded to their batch size) give exactly the tokens of eager steps, greedy
/// and seeded, while the batch shrinks through several sizes.
#[test]
fn cuda_graph_replays_give_the_eager_tokens() {
    let b = gpu();
    let fx = Fixture::load("tiny-idefics-a");
    let p = Pipeline::load(&fx.dir, b, false).unwrap();
    let (prompt, _) = p.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
    let run = |decode_graphs: bool| {
        let config = EngineConfig {
            block_size: BLOCK,
            kv_blocks: 64,
            media_slots: 16,
            max_seqs: 11,
            max_step_tokens: 512,
            decode_graphs,
            prefix_cache: true,
        };
        let mut engine = Engine::new(&p, config).unwrap();
        for i in 0..11u64 {
            let mut req = greedy(3 + i as usize % 7);
            req.ignore_eos = true;
            if i % 2 == 1 {
                req.sampling = SamplingParams {
                    temperature: 0.9,
                    top_k: 40,
                    top_p: 0.95,
                    repetition_penalty: 1.1,
                    seed: i,
                    ..Default::default()
                };
            }
            engine
                .add_request(prompt.clone(), fx.golden_pixels(), &req)
                .unwrap();
        }
        let mut out = std::collections::BTreeMap::new();
        engine
            .run_to_completion(|e| {
                if let Event::Finished { id, output } = e {
                    out.insert(id, output.generated_ids);
                }
            })
            .unwrap();
        (out, engine.stats().recorded_steps)
    };
    let (eager, none) = run(false);
    let (replayed, recorded) = run(true);
    assert_eq!(none, 0);
    assert!(recorded >= 6, "{recorded} steps ran from graphs");
    assert_eq!(replayed, eager);
}

#[test]
fn timestamps_time_device_work_and_reuse_their_events() {
    let b = gpu();
    // 8 products of 512x4096x4096 (137 GFLOP) on a GPU; 128x256x256 on the simulator, where that is seconds.
    let (m, n) = if device() == "hardware" {
        (512, 4096)
    } else {
        (128, 256)
    };
    let w = RandomWeights::new(300, &[("w", &[n, n], true)]);
    let w = b.load_weight(&w.get("w")).unwrap();
    let x = b.from_host(random_values(301, m * n), m, n);
    b.synchronize();
    let host = Instant::now();
    let start = b.timestamp();
    for _ in 0..8 {
        drop(b.linear(&x, &w, None));
    }
    let end = b.timestamp();
    b.synchronize();
    let wall_us = host.elapsed().as_secs_f64() * 1e6;
    let device_us = b.elapsed_us(&start, &end);
    // Well over 50 us on any GPU (and on the simulator), and inside the host's wall time.
    assert!(
        (50.0..=wall_us).contains(&device_us),
        "8 GEMMs in {device_us:.1} us of device time, {wall_us:.1} us of wall time"
    );
    let before = b.timing_events();
    for _ in 0..50 {
        let stamps: Vec<_> = (0..100).map(|_| b.timestamp()).collect();
        b.synchronize();
        assert!(stamps.windows(2).all(|s| b.elapsed_us(&s[0], &s[1]) >= 0.0));
    }
    let created = b.timing_events() - before;
    assert!(
        created <= 100,
        "5000 stamps in batches of 100 created {created} events"
    );
}

#[test]
fn profile_times_every_op_on_the_device_clock() {
    let b = gpu();
    let fx = Fixture::load("tiny-idefics-a");
    let p = Pipeline::load(&fx.dir, Profiled::new(b), false).unwrap();
    let workload = Workload {
        prompt_tokens: 8,
        batch: 2,
        decode_steps: 6,
    };
    profile_steps(&p, &workload, 1).unwrap();
    let prof = &p.backend;
    let records = prof.records();
    for phase in ["prefill", "decode"] {
        let ops: Vec<_> = records.iter().filter(|r| r.phase == phase).collect();
        assert!(!ops.is_empty(), "no {phase} ops");
        // One stream: each op starts after the one queued before it ends (events resolve to about 0.5 us).
        for pair in ops.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                a.duration_us >= 0.0 && b.start_us + 1.0 >= a.start_us + a.duration_us,
                "{phase}: {} at {:.1} us for {:.1} us, then {} at {:.1} us",
                a.op,
                a.start_us,
                a.duration_us,
                b.op,
                b.start_us
            );
        }
        let in_ops: f64 = ops.iter().map(|r| r.duration_us).sum();
        assert!(
            in_ops > 0.0 && in_ops <= prof.phase_us(phase),
            "{phase}: {in_ops} us in ops"
        );
    }
    // Events are read and reused at the end of each step: the largest step (the prefill) bounds them.
    let prefill_ops = records.iter().filter(|r| r.phase == "prefill").count();
    let created = prof.inner().timing_events();
    assert!(
        created <= 2 * prefill_ops + 1,
        "{created} events for {} ops, {prefill_ops} in the prefill",
        records.len()
    );
}

#[test]
fn ceilings_measure_cublas_beside_our_gemm() {
    let b = gpu();
    // The simulator runs the method on a 256³ product and a 16 MiB copy; its rates are the host's, not a chip's.
    let on_chip = device() == "hardware";
    let c = if on_chip {
        b.measure_ceilings()
    } else {
        b.measure_ceilings_at(CeilingSizes {
            copy_elems: 8 << 20,
            gemm_n: 256,
        })
    };
    let _ = writeln!(
        std::io::stderr(),
        "ceilings: copy {:.0} GB/s, matmul {:.1} TFLOP/s ({})",
        c.copy_bytes_per_s / 1e9,
        c.matmul_flops_per_s / 1e12,
        c.method
    );
    let (copy_floor, matmul_floor) = if on_chip { (1e11, 1e12) } else { (0.0, 0.0) };
    assert!(c.copy_bytes_per_s > copy_floor && c.copy_bytes_per_s.is_finite());
    assert!(c.matmul_flops_per_s > matmul_floor && c.matmul_flops_per_s.is_finite());
    match cublas_library() {
        Ok(_) => assert!(
            c.method.contains("cuBLAS bf16 GEMM") && c.method.contains("of cuBLAS"),
            "{}",
            c.method
        ),
        Err(_) => assert!(c.method.contains("no cuBLAS yardstick"), "{}", c.method),
    }
}

#[test]
fn cublas_product_matches_our_linear() {
    let b = gpu();
    let blas = match b.cublas() {
        Ok(blas) => blas,
        Err(why) => {
            let _ = writeln!(std::io::stderr(), "skipped: no cuBLAS ({why})");
            return;
        }
    };
    let (m, n, k) = (37, 130, 96);
    let w = RandomWeights::new(310, &[("w", &[n, k], true)]);
    let w = b.load_weight(&w.get("w")).unwrap();
    let v: Vec<f32> = random_values(311, m * k)
        .into_iter()
        .map(|x| half::bf16::from_f32(x).to_f32())
        .collect();
    let x = b.from_host(v, m, k);
    let ours: Vec<f64> = b
        .to_host(&b.linear(&x, &w, None))
        .into_iter()
        .map(f64::from)
        .collect();
    assert_close(
        "cuBLAS x @ w^T",
        &b.to_host(&blas.linear(&b, &x, &w)),
        &ours,
        TOL,
    );
}

/// Above 64 rows linear layers take the tensor-core GEMM: the small-tile kernel (too few large tiles to fill the
/// GPU) and the large-tile one must give bit-identical rows, since recorded decode steps of 65..256 sequences pad
/// across that choice.
#[test]
fn gemm_rows_are_bit_identical_across_batch_sizes() {
    let b = gpu();
    let w = RandomWeights::new(1100, &[("w", &[4096, 257], true)]);
    let lin = b.load_weight(&w.get("w")).unwrap();
    let x = b.from_host(random_values(1101, 640 * 257), 640, 257);
    // 640 rows x 32 column tiles of 128 fill an H200's 132 SMs: the large tiles; 65 and 130 rows: the small ones.
    let all = b.to_host(&b.linear(&x, &lin, None));
    for (start, len) in [(100, 65), (7, 130), (0, 640)] {
        let part = b.to_host(&b.linear(&b.slice_rows(&x, start, len), &lin, None));
        let want = &all[start * 4096..(start + len) * 4096];
        let differ = differing_bits(&part, want);
        assert_eq!(
            differ,
            0,
            "rows {start}..{}: {differ} values differ from the batch of 640",
            start + len
        );
    }
}

/// A decode step (one query row per sequence, no image) of sequences with `lens` keys, each block of their tables
/// taken from `next_block`.
fn decode_step(lens: &[usize], mut next_block: impl FnMut() -> u32) -> StepLayout {
    let seqs = lens
        .iter()
        .map(|&len| SeqStep {
            q_rows: 1,
            kv_len: len,
            block_table: (0..len.div_ceil(BLOCK)).map(|_| next_block()).collect(),
            image_of_row: vec![-1],
            decode_from: 0,
        })
        .collect();
    StepLayout {
        block_size: BLOCK,
        seqs,
    }
}

/// A recorded decode step in a fixed shape much longer than its sequences (several empty flash-decoding splits,
/// padded block tables), replayed with other lengths, tables and queries, equals eager launches bit for bit.
#[test]
fn recorded_steps_in_a_fixed_shape_equal_eager_steps() {
    let b = gpu();
    let (heads, d, blocks) = (4, 64, 80);
    let w = heads * d;
    let pool = |seed| b.from_host(random_values(seed, blocks * BLOCK * w), blocks * BLOCK, w);
    let (kp, vp) = (pool(300), pool(301));
    let mut q = b.from_host(random_values(302, 4 * w), 4, w);
    let shape = DecodeShape {
        table_width: 64,
        max_kv: 1024,
    };
    let mut graphs = b.new_step_graphs(d).expect("head dim 64 can be recorded");
    let mut free: Vec<u32> = (0..blocks as u32).rev().collect();
    for (round, lens) in [[5, 300, 17, 256], [40, 1, 600, 129], [1, 1, 1, 1]]
        .iter()
        .enumerate()
    {
        let step = decode_step(lens, || free.pop().unwrap());
        // New queries in the same buffer: a replay reads the recorded pointers.
        b.write_rows(
            &mut q,
            0,
            &b.from_host(random_values(310 + round as u64, 4 * w), 4, w),
        );
        let eager = b.to_host(&b.paged_attention(&q, &kp, &vp, heads, &b.layout(&step), None));
        let recorded = b
            .run_recorded(&mut graphs, &[0; 4], &step, shape, 4, &mut |layout| {
                Ok(b.paged_attention(&q, &kp, &vp, heads, layout, None))
            })
            .unwrap();
        assert_eq!(
            b.to_host(&recorded),
            eager,
            "round {round}: lengths {lens:?}"
        );
        for s in &step.seqs {
            free.extend(&s.block_table);
        }
    }
}

/// What a graph cannot replay is refused with an error, never a panic (the engine then runs such steps kernel by
/// kernel): a step outside the recorded shape, and a host-to-device copy made while recording. The same graphs
/// then record and replay a proper step, equal to the eager one.
#[test]
fn recording_refuses_what_a_graph_cannot_replay() {
    let b = gpu();
    let (heads, d, blocks) = (2, 64, 8);
    let w = heads * d;
    let pool = |seed| b.from_host(random_values(seed, blocks * BLOCK * w), blocks * BLOCK, w);
    let (kp, vp) = (pool(320), pool(321));
    let q = b.from_host(random_values(322, 2 * w), 2, w);
    let shape = DecodeShape {
        table_width: 2,
        max_kv: 2 * BLOCK,
    };
    let step = |lens: &[usize]| {
        let mut next = 0u32..;
        decode_step(lens, || next.next().unwrap())
    };
    let mut graphs = b.new_step_graphs(d).expect("head dim 64 can be recorded");
    let attend = |layout: &CudaLayout| Ok(b.paged_attention(&q, &kp, &vp, heads, layout, None));

    let too_long = step(&[2 * BLOCK + 1, 1]);
    let err = b
        .run_recorded(&mut graphs, &[0; 2], &too_long, shape, 2, &mut |l| {
            attend(l)
        })
        .err()
        .expect("a step longer than the shape is refused");
    assert!(err.to_string().contains("positions at most"), "{err}");

    let fits = step(&[5, BLOCK + 3]);
    let err = b
        .run_recorded(&mut graphs, &[0; 2], &fits, shape, 2, &mut |l| {
            drop(b.from_host(vec![1.0; w], 1, w)); // a copy a replay could not repeat
            attend(l)
        })
        .err()
        .expect("a host copy while recording is refused");
    assert!(err.to_string().contains("host-to-device copy"), "{err}");

    let eager = b.to_host(&b.paged_attention(&q, &kp, &vp, heads, &b.layout(&fits), None));
    for round in 0..2 {
        let recorded = b
            .run_recorded(&mut graphs, &[0; 2], &fits, shape, 2, &mut |l| attend(l))
            .unwrap();
        assert_eq!(b.to_host(&recorded), eager, "round {round}");
    }
}

/// Backends share a process (a server's engine beside a tool, or tests run in parallel): while one records a decode
/// step, another made on a second thread opens, allocates, copies both ways and runs kernels, and the recording
/// still replays the eager result.
#[test]
fn another_backend_works_while_one_records() {
    let b = gpu();
    let (heads, d, blocks) = (2, 64, 4);
    let w = heads * d;
    let pool = |seed| b.from_host(random_values(seed, blocks * BLOCK * w), blocks * BLOCK, w);
    let (kp, vp) = (pool(330), pool(331));
    let q = b.from_host(random_values(332, 2 * w), 2, w);
    let shape = DecodeShape {
        table_width: 2,
        max_kv: 2 * BLOCK,
    };
    let mut next = 0u32..;
    let step = decode_step(&[7, BLOCK + 1], || next.next().unwrap());
    let eager = b.to_host(&b.paged_attention(&q, &kp, &vp, heads, &b.layout(&step), None));
    let mut graphs = b.new_step_graphs(d).expect("head dim 64 can be recorded");
    let recorded = b
        .run_recorded(&mut graphs, &[0; 2], &step, shape, 2, &mut |l| {
            let other = std::thread::spawn(|| {
                let c = gpu();
                let x = c.from_host(random_values(333, 3 * 40), 3, 40);
                c.to_host(&c.swiglu(&x, &x))
            });
            let y = other.join().expect("the other backend's thread");
            assert!(
                y.len() == 3 * 40 && y.iter().all(|v| v.is_finite()),
                "the other backend ran while this one recorded"
            );
            Ok(b.paged_attention(&q, &kp, &vp, heads, l, None))
        })
        .expect("the recording survives another backend's work");
    assert_eq!(b.to_host(&recorded), eager);
}

/// The capture rules the recorded decode steps rely on, as the driver (the GPU's or the simulated one) enforces
/// them: an allocation inside a thread-local capture, or synchronising the capturing stream, is refused and
/// invalidates the capture, while another thread allocates freely (tests and backends share the process); a clean
/// capture records its work without running it, and its graph runs it. No test uses a global-mode capture: it would
/// refuse every other thread's allocations.
#[test]
fn stream_capture_refuses_allocation_and_synchronisation() {
    use cudarc::driver::sys::cudaError_enum::{
        CUDA_ERROR_STREAM_CAPTURE_INVALIDATED as INVALIDATED,
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED as UNSUPPORTED,
    };
    use cudarc::driver::sys::CUstreamCaptureMode::{
        CU_STREAM_CAPTURE_MODE_RELAXED as RELAXED,
        CU_STREAM_CAPTURE_MODE_THREAD_LOCAL as THREAD_LOCAL,
    };
    use cudarc::driver::{result, sys::CUgraphInstantiate_flags, CudaContext};
    device();
    let ctx = CudaContext::new(0).unwrap();
    // SAFETY: this test makes no `CudaSlice`; without tracking, making the stream does not synchronise the context
    // (which would invalidate the graphs other tests record meanwhile).
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let code = |r: Result<(), cudarc::driver::DriverError>| r.err().map(|e| e.0);
    let flags = CUgraphInstantiate_flags(0);

    stream.begin_capture(THREAD_LOCAL).unwrap();
    let elsewhere = std::thread::spawn(|| {
        // SAFETY: a 256-byte allocation freed at once; nothing is read or written.
        unsafe { result::malloc_sync(256).and_then(|p| result::free_sync(p)) }
    });
    assert_eq!(
        code(elsewhere.join().unwrap()),
        None,
        "another thread allocates during a thread-local capture"
    );
    // SAFETY: a plain allocation (refused here); nothing is read or written.
    let alloc = unsafe { result::malloc_sync(256) };
    assert_eq!(alloc.err().map(|e| e.0), Some(UNSUPPORTED));
    assert_eq!(code(stream.end_capture(flags).map(drop)), Some(INVALIDATED));

    stream.begin_capture(RELAXED).unwrap();
    assert_eq!(code(stream.synchronize()), Some(UNSUPPORTED));
    assert_eq!(code(stream.end_capture(flags).map(drop)), Some(INVALIDATED));

    // SAFETY: a 256-byte allocation, set and read within its size, freed at the end.
    unsafe {
        let buf = result::malloc_sync(256).unwrap();
        result::memset_d8_async(buf, 0, 256, stream.cu_stream()).unwrap();
        stream.synchronize().unwrap();
        stream.begin_capture(RELAXED).unwrap();
        result::memset_d8_async(buf, 7, 256, stream.cu_stream()).unwrap();
        let graph = stream
            .end_capture(flags)
            .unwrap()
            .expect("one node captured");
        let mut host = [1u8; 256];
        result::memcpy_dtoh_sync(&mut host, buf).unwrap();
        assert!(
            host.iter().all(|&b| b == 0),
            "captured work does not run at capture"
        );
        graph.launch().unwrap();
        stream.synchronize().unwrap();
        result::memcpy_dtoh_sync(&mut host, buf).unwrap();
        assert!(host.iter().all(|&b| b == 7), "the graph runs it");
        drop(graph);
        result::free_sync(buf).unwrap();
    }
}

/// The CLI on the device as a user runs it: `generate` and `batch` with `--device cuda` give the CPU's tokens on the
/// bundled demo model, and stderr names the device. Without a GPU the binary reaches the simulated device the way
/// a user would point it there: `CUDA_HOME` and `LD_LIBRARY_PATH`.
#[test]
fn cli_generate_and_batch_on_the_device_give_the_cpu_tokens() {
    let env: Vec<(&str, std::path::PathBuf)> = match device() {
        "simulated" => {
            let home = cudasim::home();
            vec![("LD_LIBRARY_PATH", home.join("lib64")), ("CUDA_HOME", home)]
        }
        _ => vec![],
    };
    let flamingo = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flamingo"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "flamingo {args:?}: {stderr}");
        (String::from_utf8(out.stdout).unwrap(), stderr)
    };
    let ids = |json: &str| -> Vec<Vec<u64>> {
        json.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                serde_json::from_value(v["generated_ids"].clone()).unwrap()
            })
            .collect()
    };
    let generate = ["generate", "--json", "--max-new-tokens", "12", "--device"];
    let (cpu, _) = flamingo(&[&generate[..], &["cpu"]].concat());
    let (gpu, note) = flamingo(&[&generate[..], &["cuda"]].concat());
    assert!(note.contains("note: --device cuda:0: cuda:0 "), "{note}");
    assert_eq!(ids(&gpu), ids(&cpu), "generate");

    let dir = tempfile::tempdir().unwrap();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/examples");
    let requests: String = ["shapes.png", "shapes-2.png", "shapes-4.png"]
        .iter()
        .map(|img| {
            let img = examples.join(img);
            format!(
                "{{\"prompt\": \"User:<image>Describe this image.<end_of_utterance>\\nAssistant:\", \"images\": [{:?}], \"max_new_tokens\": 10}}\n",
                img.display().to_string()
            )
        })
        .collect();
    let input = dir.path().join("requests.jsonl");
    std::fs::write(&input, requests).unwrap();
    let batch = |device: &str| {
        let out = dir.path().join(format!("{device}.jsonl"));
        let input = input.display().to_string();
        let output = out.display().to_string();
        flamingo(&[
            "batch", "--input", &input, "--output", &output, "--device", device,
        ]);
        ids(&std::fs::read_to_string(out).unwrap())
    };
    let on_cpu = batch("cpu");
    assert_eq!(on_cpu.len(), 3);
    assert_eq!(batch("cuda"), on_cpu, "batch");
}

/// Log-probabilities and forks on the device: a prompt scored and three seeded choices with OpenAI's penalties
/// and their log-probabilities, forked from one prefill on the GPU backend, against the CPU backend running the
/// same requests. bf16 activations: greedy ids equal and log-probabilities within 0.05 nats where the tokens
/// agree; the GPU's forks equal the GPU's lone runs exactly (batch invariance holds on the device too).
#[test]
fn logprobs_and_forked_choices_on_the_device_match_the_cpu() {
    use flamingo::runtime::engine::ForkedRequest;
    use flamingo::runtime::request::{GenerationOutput, GenerationRequest};
    let fx = Fixture::load("tiny-idefics-a");
    let cpu = Pipeline::load(&fx.dir, CpuBackend::new(), false).unwrap();
    let dev = Pipeline::load(&fx.dir, gpu(), false).unwrap();
    let (prefix, _) = cpu.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
    let mut children = Vec::new();
    for i in 0..3u64 {
        let sampling = SamplingParams {
            temperature: if i == 0 { 0.0 } else { 0.8 },
            seed: i,
            logprobs: Some(3),
            frequency_penalty: 0.5,
            logit_bias: vec![(7, 2.0)],
            ..Default::default()
        };
        let request = GenerationRequest { max_new_tokens: 5, sampling, ..Default::default() };
        children.push(ForkedRequest { prompt: prefix.clone(), request, scored_from: 1 });
    }
    let scored = GenerationRequest { max_new_tokens: 0, prompt_logprobs: Some(2), ..Default::default() };
    fn forked<B: Backend>(
        p: &Pipeline<B>,
        prefix: &flamingo::io::prompt::EncodedPrompt,
        pixels: Vec<flamingo::io::image::PreparedImage>,
        children: &[ForkedRequest],
    ) -> Vec<GenerationOutput> {
        let config = EngineConfig {
            block_size: BLOCK,
            kv_blocks: 32,
            media_slots: 4,
            max_seqs: 4,
            max_step_tokens: 256,
            decode_graphs: true,
            prefix_cache: true,
        };
        let mut engine = Engine::new(p, config).unwrap();
        let ids = engine.add_forked(prefix.clone(), pixels, children.to_vec()).unwrap();
        let mut outs = std::collections::HashMap::new();
        engine
            .run_to_completion(|e| {
                if let Event::Finished { id, output } = e {
                    outs.insert(id, output);
                }
            })
            .unwrap();
        ids.iter().map(|id| outs.remove(id).unwrap()).collect()
    }
    let on_cpu = forked(&cpu, &prefix, fx.golden_pixels(), &children);
    let on_dev = forked(&dev, &prefix, fx.golden_pixels(), &children);
    for (i, c) in children.iter().enumerate() {
        let alone = dev.generate(&c.prompt, fx.golden_pixels(), &c.request, |_| {}).unwrap();
        assert_eq!(on_dev[i].generated_ids, alone.generated_ids, "choice {i}: forked vs alone on the device");
        assert_eq!(on_dev[i].logprobs, alone.logprobs, "choice {i}");
    }
    assert_eq!(on_dev[0].generated_ids, on_cpu[0].generated_ids, "greedy choice");
    for (c, d) in on_cpu.iter().zip(&on_dev) {
        for (a, b) in c.logprobs.iter().zip(&d.logprobs).take_while(|(a, b)| a.token == b.token) {
            assert!((a.logprob - b.logprob).abs() < 5e-2, "{a:?} vs {b:?}");
            assert_eq!(b.top.len(), 3);
        }
    }
    let sc = cpu.generate(&prefix, fx.golden_pixels(), &scored, |_| {}).unwrap();
    let sd = dev.generate(&prefix, fx.golden_pixels(), &scored, |_| {}).unwrap();
    assert_eq!(sd.prompt_logprobs.len(), prefix.ids.len() - 1);
    let worst = sc
        .prompt_logprobs
        .iter()
        .zip(&sd.prompt_logprobs)
        .map(|(a, b)| (a.logprob - b.logprob).abs())
        .fold(0f32, f32::max);
    let _ = writeln!(std::io::stderr(), "prompt logprobs: largest CPU / device difference {worst:.2e} nats");
    assert!(worst < 5e-2, "{worst}");
}

/// Prefix caching and the media cache by content on the device: requests from shared few-shot prefixes, with
/// arrivals interleaved and pools small enough to preempt and evict, give the same bits with and without the
/// caches (a position's attention path depends on its kind, never on how it was scheduled). 20 requests, not the
/// CPU test's 200: the simulated device takes about 5 s a request.
#[test]
fn prefix_cache_on_the_device_gives_the_same_bits_as_without() {
    use common::shared_prefixes::{assert_same_outputs, image_variants, run_interleaved, shared_prefix_cases, tight_config};
    let fx = Fixture::load("tiny-idefics-a");
    let p = Pipeline::load(&fx.dir, gpu(), false).unwrap();
    let images = image_variants(&fx.golden_pixels()[0]);
    let cases = shared_prefix_cases(&p, &images, 20, 3);
    let (uncached, plain) = run_interleaved(&p, tight_config(20, false), &cases, 5);
    let (cached, stats) = run_interleaved(&p, tight_config(20, true), &cases, 5);
    assert_same_outputs("device, cached vs uncached", &cached, &uncached);
    let c = stats.cache;
    assert!(c.prefix_hit_rows * 4 > c.admitted_rows && c.media_hits * 2 > c.admitted_images, "{c:?}");
    assert!(c.block_evictions > 0 && stats.preemptions > 0 && plain.preemptions > 0, "{c:?} {plain:?}");
    assert!(stats.recorded_steps > 0, "decode steps ran from recordings too");
}
