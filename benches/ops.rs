//! Every op family through the `Backend` trait at IDEFICS layer shapes: linear layers (each layer shape at several
//! row counts), causal prefill attention, paged decode attention, cross-attention, resampler and vision attention,
//! norms, RoPE, elementwise ops, data movement (embedding, gather, KV writes), batch sampling of the LM head's
//! logits. Compute-bound ops report FLOP/s as criterion's `elem/s`; memory-bound ones bytes/s. Each kernel file's
//! header names the functions here that measure it.
//!
//! On the CPU the shapes are those of `cpu-mid` (hidden 1024) and the largest sizes are left out, so
//! `cargo bench --bench ops` takes minutes; on a GPU (`FLAMINGO_BENCH_DEVICE=cuda`, once the CUDA backend is in
//! this build) they are idefics-9b's and idefics-80b's. Linear weights are bf16, as checkpoints ship, and f32.

mod common;

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use flamingo::backend::{Backend, RowSampling, SeqStep, StepLayout};
use flamingo::cli::options::BackendCommand;
use flamingo::io::config::{Activation, IdeficsConfig, RopeFrequencies};
use flamingo::io::safetensors::DType;
use flamingo::model::idefics::synthetic::Preset;
use flamingo::model::synthetic::random_store;

/// The workloads of one device class.
struct Shapes {
    configs: Vec<Preset>,
    gemm_rows: &'static [usize],
    prefill_lens: &'static [usize],
    /// (sequences, cached positions each)
    decode: &'static [(usize, usize)],
    norm_rows: &'static [usize],
}

fn shapes() -> Shapes {
    match common::device().as_str() {
        "cpu" => Shapes {
            configs: vec![Preset::CpuMid],
            gemm_rows: &[1, 16, 128, 512],
            prefill_lens: &[512, 2048],
            decode: &[(1, 512), (8, 512), (32, 2048)],
            norm_rows: &[1, 128, 2048],
        },
        _ => Shapes {
            configs: vec![Preset::Idefics9b, Preset::Idefics80b],
            gemm_rows: &[1, 16, 128, 2048],
            prefill_lens: &[512, 2048, 8192],
            decode: &[(1, 512), (1, 8192), (32, 1024), (128, 1024)],
            norm_rows: &[1, 128, 2048],
        },
    }
}

/// Every distinct linear-layer shape `(name, out, in)` of a configuration.
fn linear_shapes(cfg: &IdeficsConfig) -> Vec<(&'static str, usize, usize)> {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let v = &cfg.vision_config;
    let (dv, mv) = (v.embed_dim, v.intermediate_size);
    let p = &cfg.perceiver_config;
    let inner = p.resampler_n_heads * p.resampler_head_dim;
    let mut all = vec![
        ("attn_qkvo", d, d),
        ("mlp_gate_up", i, d),
        ("mlp_down", d, i),
        ("lm_head", cfg.vocab_size, d),
        ("xattn_kv", d, dv),
        ("vision_qkvo", dv, dv),
        ("vision_fc1", mv, dv),
        ("vision_fc2", dv, mv),
        ("perceiver_qkv", inner, dv),
        ("perceiver_out", dv, inner),
    ];
    let mut seen = std::collections::HashSet::new();
    all.retain(|&(_, n, k)| seen.insert((n, k)));
    all
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

/// A `[rows, cols]` activation of fixed non-zero values.
fn activation<B: Backend>(b: &B, rows: usize, cols: usize, seed: usize) -> B::Tensor {
    let data = (0..rows * cols)
        .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 * 1e-3 - 1.0)
        .collect();
    b.from_host(data, rows, cols)
}

/// A weight of `shape` with synthetic values (a 1-D `.weight` is a norm scale).
fn weight<B: Backend>(b: &B, name: &str, dtype: DType, shape: &[usize]) -> B::Weight {
    let store = random_store(vec![(name.into(), dtype, shape.to_vec())], "bench".into());
    b.load_weight(&store.get(name, shape).unwrap()).unwrap()
}

/// `seqs` sequences of `kv_len` positions each, the last `q_rows` of each new this step, all seeing image 0.
fn layout<B: Backend>(b: &B, seqs: usize, q_rows: usize, kv_len: usize) -> B::Layout {
    let block_size = 16;
    let blocks = kv_len.div_ceil(block_size);
    let step = StepLayout {
        block_size,
        seqs: (0..seqs)
            .map(|s| SeqStep {
                q_rows,
                kv_len,
                block_table: (s * blocks..(s + 1) * blocks).map(|x| x as u32).collect(),
                image_of_row: vec![0; q_rows],
                decode_from: if q_rows == 1 { kv_len - 1 } else { kv_len },
            })
            .collect(),
    };
    b.layout(&step)
}

fn linear<B: Backend>(c: &mut Criterion, b: &B, s: &Shapes, preset: Preset, cfg: &IdeficsConfig) {
    // bf16 as checkpoints ship; f32 (packed once at load on the CPU) as the cpu-mid comparison with PyTorch runs.
    for (label, dtype) in [("bf16", DType::BF16), ("f32", DType::F32)] {
        let mut g = group(c, &format!("linear_{label}/{}", preset.name()));
        for (name, n, k) in linear_shapes(cfg) {
            let w = weight(b, "w.weight", dtype, &[n, k]);
            for &m in s.gemm_rows {
                let x = activation(b, m, k, 1);
                g.throughput(Throughput::Elements((2 * m * n * k) as u64));
                g.bench_function(format!("{name}_{n}x{k}/m{m}"), |bench| {
                    bench.iter_custom(|iters| common::timed(b, iters, || b.linear(&x, &w, None)))
                });
            }
        }
        g.finish();
    }
}

fn attention<B: Backend>(
    c: &mut Criterion,
    b: &B,
    s: &Shapes,
    preset: Preset,
    cfg: &IdeficsConfig,
) {
    let (heads, width) = (cfg.num_attention_heads, cfg.hidden_size);
    let mut g = group(c, &format!("attention/{}", preset.name()));
    for &len in s.prefill_lens {
        let (q, pool) = (activation(b, len, width, 2), activation(b, len, width, 3));
        let l = layout(b, 1, len, len);
        g.throughput(Throughput::Elements((2 * len * len * width) as u64));
        g.bench_function(format!("prefill_causal/{len}"), |bench| {
            bench.iter_custom(|iters| {
                common::timed(b, iters, || b.paged_attention(&q, &pool, &pool, heads, &l, None))
            })
        });
    }
    for &(seqs, ctx) in s.decode {
        let q = activation(b, seqs, width, 4);
        let pool = activation(b, seqs * ctx.next_multiple_of(16), width, 5);
        let l = layout(b, seqs, 1, ctx);
        let kv_bytes = 2 * seqs * ctx * width * b.activation_width();
        g.throughput(Throughput::BytesDecimal(kv_bytes as u64));
        g.bench_function(format!("decode_paged/{seqs}x{ctx}"), |bench| {
            bench.iter_custom(|iters| {
                common::timed(b, iters, || b.paged_attention(&q, &pool, &pool, heads, &l, None))
            })
        });
    }
    g.finish();
}

/// Cross-attention of decoder rows over one image's tokens, then the tanh gate.
fn cross_attention<B: Backend>(c: &mut Criterion, b: &B, preset: Preset, cfg: &IdeficsConfig) {
    let (heads, width) = (cfg.num_attention_heads, cfg.hidden_size);
    let per_image = cfg.image_tokens_per_image();
    let kv = activation(b, per_image, width, 6);
    let gate = weight(b, "x.alpha_cross_attn", DType::F32, &[1]);
    let mut g = group(c, &format!("cross_attention/{}", preset.name()));
    for (name, seqs, rows) in [("decode", 32, 1), ("prefill", 1, 64)] {
        let q = activation(b, seqs * rows, width, 7);
        let l = layout(b, seqs, rows, rows);
        g.throughput(Throughput::Elements(
            (4 * seqs * rows * per_image * width) as u64,
        ));
        g.bench_function(format!("{name}/{seqs}x{rows}"), |bench| {
            bench.iter_custom(|iters| {
                let mut h = activation(b, seqs * rows, width, 8);
                common::timed(b, iters, || {
                    let a = b.cross_attention(&q, &kv, &kv, heads, &l, per_image);
                    b.add_gated(&mut h, &a, &gate);
                })
            })
        });
    }
    g.finish();
}

/// The perceiver's latent queries over `[context ; latents]`, and the vision encoder's full attention.
fn image_attention<B: Backend>(c: &mut Criterion, b: &B, preset: Preset, cfg: &IdeficsConfig) {
    let p = &cfg.perceiver_config;
    let v = &cfg.vision_config;
    let (tokens, lat) = (v.num_positions(), p.resampler_n_latents);
    let inner = p.resampler_n_heads * p.resampler_head_dim;
    let mut g = group(c, &format!("image_attention/{}", preset.name()));
    let (q, ctx, lats) = (
        activation(b, lat, inner, 9),
        activation(b, tokens, inner, 10),
        activation(b, lat, inner, 11),
    );
    g.throughput(Throughput::Elements(
        (4 * lat * (tokens + lat) * inner) as u64,
    ));
    g.bench_function(format!("resampler/{lat}x{}", tokens + lat), |bench| {
        bench.iter_custom(|iters| {
            common::timed(b, iters, || {
                b.resampler_attention(&q, &ctx, &ctx, &lats, &lats, p.resampler_n_heads)
            })
        })
    });
    let x = activation(b, tokens, v.embed_dim, 12);
    g.throughput(Throughput::Elements(
        (4 * tokens * tokens * v.embed_dim) as u64,
    ));
    g.bench_function(format!("vision/{tokens}"), |bench| {
        bench.iter_custom(|iters| {
            common::timed(b, iters, || b.attention(&x, &x, &x, v.num_attention_heads))
        })
    });
    g.finish();
}

fn norms<B: Backend>(c: &mut Criterion, b: &B, s: &Shapes, preset: Preset, cfg: &IdeficsConfig) {
    let (d, dv) = (cfg.hidden_size, cfg.vision_config.embed_dim);
    let rms = weight(b, "n.weight", DType::F32, &[d]);
    let (ln_w, ln_b) = (
        weight(b, "ln.weight", DType::F32, &[dv]),
        weight(b, "ln.bias", DType::F32, &[dv]),
    );
    let mut g = group(c, &format!("norms/{}", preset.name()));
    for &rows in s.norm_rows {
        let x = activation(b, rows, d, 13);
        g.throughput(Throughput::BytesDecimal(
            (2 * rows * d * b.activation_width()) as u64,
        ));
        g.bench_function(format!("rms_norm/{rows}x{d}"), |bench| {
            bench.iter_custom(|iters| common::timed(b, iters, || b.rms_norm(&x, &rms, 1e-6)))
        });
    }
    let rows = cfg.vision_config.num_positions();
    let x = activation(b, rows, dv, 14);
    g.throughput(Throughput::BytesDecimal(
        (2 * rows * dv * b.activation_width()) as u64,
    ));
    g.bench_function(format!("layer_norm/{rows}x{dv}"), |bench| {
        bench.iter_custom(|iters| common::timed(b, iters, || b.layer_norm(&x, &ln_w, &ln_b, 1e-5)))
    });
    g.finish();
}

/// The decoder's elementwise ops at the norms' row counts: SwiGLU, an activation in place, the residual add and
/// the tanh-gated residual add of cross-attention.
fn elementwise<B: Backend>(
    c: &mut Criterion,
    b: &B,
    s: &Shapes,
    preset: Preset,
    cfg: &IdeficsConfig,
) {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let alpha = weight(b, "alpha", DType::F32, &[1]);
    let mut g = group(c, &format!("elementwise/{}", preset.name()));
    let bytes = |b: &B, elements: usize| (elements * b.activation_width()) as u64;
    for &rows in s.norm_rows {
        let (gate, up) = (activation(b, rows, i, 18), activation(b, rows, i, 19));
        g.throughput(Throughput::BytesDecimal(bytes(b, 3 * rows * i)));
        g.bench_function(format!("swiglu/{rows}x{i}"), |bench| {
            bench.iter_custom(|iters| common::timed(b, iters, || b.swiglu(&gate, &up)))
        });
        let mut x = activation(b, rows, i, 20);
        g.throughput(Throughput::BytesDecimal(bytes(b, 2 * rows * i)));
        g.bench_function(format!("activate_gelu/{rows}x{i}"), |bench| {
            bench.iter_custom(|iters| {
                common::timed(b, iters, || b.activate(&mut x, Activation::Gelu))
            })
        });
        let (mut acc, y) = (activation(b, rows, d, 21), activation(b, rows, d, 22));
        g.throughput(Throughput::BytesDecimal(bytes(b, 3 * rows * d)));
        g.bench_function(format!("add_assign/{rows}x{d}"), |bench| {
            bench.iter_custom(|iters| common::timed(b, iters, || b.add_assign(&mut acc, &y)))
        });
        g.bench_function(format!("add_gated/{rows}x{d}"), |bench| {
            bench.iter_custom(|iters| common::timed(b, iters, || b.add_gated(&mut acc, &y, &alpha)))
        });
    }
    g.finish();
}

/// Data movement of a step: the token embedding (IDEFICS' decoupled table), the row gather before the LM head,
/// a KV-cache write, and the concatenation of image states.
fn data_movement<B: Backend>(
    c: &mut Criterion,
    b: &B,
    s: &Shapes,
    preset: Preset,
    cfg: &IdeficsConfig,
) {
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let table = weight(b, "embed.weight", DType::BF16, &[v, d]);
    let extra = weight(
        b,
        "extra.weight",
        DType::BF16,
        &[cfg.additional_vocab_size.max(1), d],
    );
    let mut g = group(c, &format!("data_movement/{}", preset.name()));
    let row_bytes = (d * b.activation_width()) as u64;
    for &rows in s.norm_rows {
        let ids: Vec<u32> = (0..rows as u32).map(|r| r * 7919 % v as u32).collect();
        g.throughput(Throughput::BytesDecimal(2 * rows as u64 * row_bytes));
        g.bench_function(format!("embedding/{rows}x{d}"), |bench| {
            bench.iter_custom(|iters| {
                common::timed(b, iters, || {
                    b.embedding(&ids, &table, Some(&extra)).unwrap()
                })
            })
        });
        let x = activation(b, rows, d, 23);
        let picked: Vec<usize> = (0..rows).rev().step_by(2).collect();
        g.throughput(Throughput::BytesDecimal(
            2 * picked.len() as u64 * row_bytes,
        ));
        g.bench_function(
            format!("gather_rows/{}of{rows}x{d}", picked.len()),
            |bench| {
                bench.iter_custom(|iters| common::timed(b, iters, || b.gather_rows(&x, &picked)))
            },
        );
        let l = layout(b, 1, rows, rows);
        let mut pool = activation(b, (rows.div_ceil(16) + 1) * 16, d, 24);
        g.throughput(Throughput::BytesDecimal(2 * rows as u64 * row_bytes));
        g.bench_function(format!("write_kv/{rows}x{d}"), |bench| {
            bench.iter_custom(|iters| common::timed(b, iters, || b.write_kv(&mut pool, &l, &x)))
        });
        g.bench_function(format!("concat_rows/2x{rows}x{d}"), |bench| {
            bench.iter_custom(|iters| common::timed(b, iters, || b.concat_rows(&x, &x)))
        });
    }
    g.finish();
}

/// RoPE of a decoder step's queries and keys (one launch for both), at the norms' row counts.
fn rope<B: Backend>(c: &mut Criterion, b: &B, s: &Shapes, preset: Preset, cfg: &IdeficsConfig) {
    let (d, head_dim) = (cfg.hidden_size, cfg.head_dim());
    let mut g = group(c, &format!("rope/{}", preset.name()));
    for &rows in s.norm_rows {
        let (mut q, mut k) = (activation(b, rows, d, 16), activation(b, rows, d, 17));
        let l = layout(b, 1, rows, rows);
        g.throughput(Throughput::BytesDecimal(
            (4 * rows * d * b.activation_width()) as u64,
        ));
        g.bench_function(format!("q_and_k/{rows}x{d}"), |bench| {
            bench.iter_custom(|iters| {
                common::timed(b, iters, || {
                    b.rope(&mut q, &mut k, head_dim, &l, &RopeFrequencies::plain(cfg.rope_theta()))
                })
            })
        });
    }
    g.finish();
}

/// One step's sampling over `[rows, vocab]` logits (the vocabulary plus IDEFICS' additional tokens): greedy;
/// temperature with top-k, top-p and a repetition penalty over 512 seen ids; and that with OpenAI's frequency
/// penalties (logit offsets) over the same ids and the top 5 log-probabilities reported. Includes bringing the ids
/// (and the rows asked for) back.
fn sampling<B: Backend>(c: &mut Criterion, b: &B, preset: Preset, cfg: &IdeficsConfig) {
    let vocab = cfg.total_vocab();
    let seen: Vec<u32> = (0..512).map(|i| i * 61 % vocab as u32).collect();
    let mut offsets: Vec<(u32, f32)> = seen.iter().map(|&id| (id, -0.25)).collect();
    offsets.sort_unstable_by_key(|o| o.0);
    offsets.dedup_by_key(|o| o.0);
    let mut g = group(c, &format!("sampling/{}", preset.name()));
    for rows in [1, 32, 128] {
        let logits = activation(b, rows, vocab, 15);
        g.throughput(Throughput::BytesDecimal(
            (rows * vocab * b.activation_width()) as u64,
        ));
        for (name, temperature, openai) in [
            ("greedy", 0.0, false),
            ("top_k_top_p_penalty", 0.8, false),
            ("openai_penalties_logprobs", 0.8, true),
        ] {
            let rule = RowSampling {
                temperature,
                top_k: 50,
                top_p: 0.9,
                repetition_penalty: if temperature > 0.0 { 1.1 } else { 1.0 },
                banned: &[0, 1],
                seen: &seen,
                logit_offsets: if openai { &offsets } else { &[] },
                uniform: 0.37,
                logprobs: openai.then_some(5),
            };
            let rules = vec![rule; rows];
            g.bench_function(format!("{name}/{rows}x{vocab}"), |bench| {
                bench.iter_custom(|iters| {
                    common::timed(b, iters, || b.sample(&logits, &rules).unwrap())
                })
            });
        }
    }
    g.finish();
}

struct Ops<'a>(&'a mut Criterion);

impl BackendCommand for Ops<'_> {
    fn run<B: Backend + 'static>(self, b: B) -> flamingo::Result<()> {
        let (c, s) = (self.0, shapes());
        for &preset in &s.configs {
            let cfg = preset.config()?;
            linear(c, &b, &s, preset, &cfg);
            attention(c, &b, &s, preset, &cfg);
            cross_attention(c, &b, preset, &cfg);
            image_attention(c, &b, preset, &cfg);
            norms(c, &b, &s, preset, &cfg);
            elementwise(c, &b, &s, preset, &cfg);
            data_movement(c, &b, &s, preset, &cfg);
            rope(c, &b, &s, preset, &cfg);
            sampling(c, &b, preset, &cfg);
        }
        Ok(())
    }
}

fn ops(c: &mut Criterion) {
    common::on_device(Ops(c));
}

criterion_group!(benches, ops);
criterion_main!(benches);
