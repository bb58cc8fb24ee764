//! Batch invariance of the CPU backend: every op computes a row the same way whatever rows share its call, so a
//! request's output cannot depend on what it is batched with. Each op runs on 64 rows of fresh random input; the
//! rows computed alone and in a batch of 3 must be bit-identical to the same rows of the batch of 64. Paged
//! attention must also equal attention over the same keys laid out contiguously (within f32 rounding of a plain
//! f64 reference).

mod common;

use common::{one_row_seqs, prompt_or_decode, random_values, RandomWeights};
use flamingo::backend::cpu::{CpuBackend, CpuTensor};
use flamingo::backend::{Backend, SeqStep, StepLayout};
use flamingo::io::config::{Activation, Alibi, RopeFrequencies};

const ROWS: usize = 300;

fn random(b: &CpuBackend, seed: u64, rows: usize, cols: usize) -> CpuTensor {
    b.from_host(random_values(seed, rows * cols), rows, cols)
}

fn bits(b: &CpuBackend, t: &CpuTensor) -> Vec<u32> {
    b.to_host(t).iter().map(|v| v.to_bits()).collect()
}

/// `op(start, len)` computes rows `start .. start + len` of some op's output from the matching rows of its inputs.
/// Rows 5..8 and row 37 alone must equal, bit for bit, the same rows computed in the batch of all 64.
fn check_rows(what: &str, op: impl Fn(usize, usize) -> CpuTensor) {
    let b = CpuBackend::new();
    let full = op(0, ROWS);
    assert_eq!(b.dims(&full).0, ROWS, "{what}: output rows");
    assert!(
        b.to_host(&full).iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    for (start, len) in [(5, 3), (37, 1), (250, 2), (100, 64)] {
        let (got, want) = (
            bits(&b, &op(start, len)),
            bits(&b, &b.slice_rows(&full, start, len)),
        );
        let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert_eq!(
            differ,
            0,
            "{what}: {differ} of {} values of rows {start}..{} differ when computed in a batch of {len}",
            got.len(),
            start + len
        );
    }
}

#[test]
fn linear_rows_do_not_depend_on_the_batch() {
    let b = CpuBackend::new();
    let w = RandomWeights::new(
        1,
        &[
            ("f32", &[1000, 257], false),
            ("bf16", &[1000, 257], true),
            ("bias", &[1000], false),
            ("wide", &[7, 4096], true),
        ],
    );
    let x = random(&b, 2, ROWS, 257);
    let bias = b.load_weight(&w.get("bias")).unwrap();
    for name in ["f32", "bf16"] {
        let weight = b.load_weight(&w.get(name)).unwrap();
        check_rows(&format!("linear {name}"), |s, n| {
            b.linear(&b.slice_rows(&x, s, n), &weight, None)
        });
        check_rows(&format!("linear {name} + bias"), |s, n| {
            b.linear(&b.slice_rows(&x, s, n), &weight, Some(&bias))
        });
    }
    let wide = b.load_weight(&w.get("wide")).unwrap();
    let x = random(&b, 3, ROWS, 4096);
    check_rows("linear k=4096", |s, n| {
        b.linear(&b.slice_rows(&x, s, n), &wide, None)
    });
}

#[test]
fn norms_activations_gates_embedding_and_rope_do_not_depend_on_the_batch() {
    let b = CpuBackend::new();
    let w = RandomWeights::new(
        10,
        &[
            ("w", &[1000], false),
            ("bias", &[1000], false),
            ("head", &[40], true),
            ("alpha", &[1], false),
            ("alpha_vec", &[1, 1, 1000], false),
            ("table", &[257, 1000], true),
            ("extra", &[7, 1000], false),
        ],
    );
    let get = |n: &str| b.load_weight(&w.get(n)).unwrap();
    let (nw, nb, head) = (get("w"), get("bias"), get("head"));
    let x = random(&b, 11, ROWS, 1000);
    let y = random(&b, 12, ROWS, 1000);
    let rows = |t: &CpuTensor, s, n| b.slice_rows(t, s, n);
    check_rows("rms_norm", |s, n| b.rms_norm(&rows(&x, s, n), &nw, 1e-6));
    check_rows("rms_norm per head", |s, n| {
        b.rms_norm(&rows(&x, s, n), &head, 1e-6)
    });
    check_rows("layer_norm", |s, n| {
        b.layer_norm(&rows(&x, s, n), &nw, &nb, 1e-5)
    });
    for act in [
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::QuickGelu,
        Activation::Relu,
    ] {
        check_rows(&format!("{act:?}"), |s, n| {
            let mut t = rows(&x, s, n);
            b.activate(&mut t, act);
            t
        });
    }
    for (what, alpha) in [("scalar", get("alpha")), ("vector", get("alpha_vec"))] {
        check_rows(&format!("add_gated {what}"), |s, n| {
            let mut t = rows(&x, s, n);
            b.add_gated(&mut t, &rows(&y, s, n), &alpha);
            t
        });
    }
    check_rows("swiglu", |s, n| b.swiglu(&rows(&x, s, n), &rows(&y, s, n)));
    check_rows("add_assign", |s, n| {
        let mut t = rows(&x, s, n);
        b.add_assign(&mut t, &rows(&y, s, n));
        t
    });
    let (table, extra) = (get("table"), get("extra"));
    let ids: Vec<u32> = (0..ROWS as u32).map(|i| (i * 37) % 264).collect();
    check_rows("embedding", |s, n| {
        b.embedding(&ids[s..s + n], &table, Some(&extra)).unwrap()
    });
    check_rows("rope", |s, n| {
        let layout = b.layout(&one_row_seqs(s..s + n, |r| 3 * r + 1, |_| -1));
        let (mut q, mut k) = (rows(&x, s, n), rows(&x, s, n));
        b.rope(&mut q, &mut k, 40, &layout, &RopeFrequencies::plain(10000.0));
        b.concat_cols(&q, &k)
    });
}

#[test]
fn attention_rows_do_not_depend_on_the_batch() {
    let b = CpuBackend::new();
    let heads = 5;
    let q = random(&b, 20, ROWS, heads * 16);
    let k = random(&b, 21, 257, heads * 16);
    let v = random(&b, 22, 257, heads * 16);
    check_rows("vision attention", |s, n| {
        b.attention(&b.slice_rows(&q, s, n), &k, &v, heads)
    });
    // Latent rows over [context ; latents] (the latents' own keys fixed, as in the resampler).
    let (kl, vl) = (
        random(&b, 25, 64, heads * 16),
        random(&b, 26, 64, heads * 16),
    );
    check_rows("resampler attention", |s, n| {
        b.resampler_attention(&b.slice_rows(&q, s, n), &k, &v, &kl, &vl, heads)
    });
    // Three images of 7 tokens in the media pools; rows see one of them or none.
    let (km, vm) = (
        random(&b, 23, 21, heads * 16),
        random(&b, 24, 21, heads * 16),
    );
    let image = |r: usize| [0, 2, -1, 1][r % 4];
    check_rows("cross attention", |s, n| {
        let layout = b.layout(&one_row_seqs(s..s + n, |_| 0, image));
        b.cross_attention(&b.slice_rows(&q, s, n), &km, &vm, heads, &layout, 7)
    });
}

/// Five sequences of odd lengths with their K/V rows written into a pool of 16-row blocks, block tables shuffled
/// (or in order); returns the pools and each sequence's table.
struct PagedFixture {
    k_rows: Vec<CpuTensor>,
    v_rows: Vec<CpuTensor>,
    lens: Vec<usize>,
}

const HEADS: usize = 3;
const HEAD_DIM: usize = 16;
const BLOCK: usize = 16;

impl PagedFixture {
    fn new(b: &CpuBackend) -> Self {
        let lens = vec![1, 7, 40, 257, 100];
        let w = HEADS * HEAD_DIM;
        PagedFixture {
            k_rows: lens
                .iter()
                .enumerate()
                .map(|(i, &n)| random(b, 100 + i as u64, n, w))
                .collect(),
            v_rows: lens
                .iter()
                .enumerate()
                .map(|(i, &n)| random(b, 200 + i as u64, n, w))
                .collect(),
            lens,
        }
    }

    /// Block tables (shuffled or in order) and the pools holding every sequence's K/V.
    fn pools(&self, b: &CpuBackend, shuffled: bool) -> (Vec<Vec<u32>>, CpuTensor, CpuTensor) {
        let blocks: usize = self.lens.iter().map(|n| n.div_ceil(BLOCK)).sum();
        let mut ids: Vec<u32> = (0..blocks as u32).collect();
        if shuffled {
            ids.reverse();
            ids.rotate_left(blocks / 3);
        }
        let mut next = ids.into_iter();
        let tables: Vec<Vec<u32>> = self
            .lens
            .iter()
            .map(|n| next.by_ref().take(n.div_ceil(BLOCK)).collect())
            .collect();
        let w = HEADS * HEAD_DIM;
        let (mut k, mut v) = (b.zeros(blocks * BLOCK, w), b.zeros(blocks * BLOCK, w));
        let all = self.layout(&tables, &(0..self.lens.len()).collect::<Vec<_>>(), None);
        let layout = b.layout(&all);
        let cat = |rows: &[CpuTensor]| rows.iter().fold(b.zeros(0, w), |a, r| b.concat_rows(&a, r));
        b.write_kv(&mut k, &layout, &cat(&self.k_rows));
        b.write_kv(&mut v, &layout, &cat(&self.v_rows));
        (tables, k, v)
    }

    /// A step over sequences `seqs`, each with all its positions as query rows, or only its last `q_rows`.
    fn layout(&self, tables: &[Vec<u32>], seqs: &[usize], q_rows: Option<usize>) -> StepLayout {
        StepLayout {
            block_size: BLOCK,
            seqs: seqs
                .iter()
                .map(|&s| {
                    let rows = q_rows.unwrap_or(self.lens[s]).min(self.lens[s]);
                    SeqStep {
                        q_rows: rows,
                        kv_len: self.lens[s],
                        block_table: tables[s].clone(),
                        image_of_row: vec![-1; rows],
                        decode_from: prompt_or_decode(rows, self.lens[s]),
                    }
                })
                .collect(),
        }
    }
}

/// With and without ALiBi (3 heads: transformers' MPT rounds to 4 and interleaves the slopes).
#[test]
fn paged_attention_equals_attention_over_contiguous_keys() {
    for alibi in [None, Some(Alibi { n: 4, bias_max: 8.0, interleave: true })] {
        paged_attention_over_contiguous_keys(alibi.as_ref());
    }
}

fn paged_attention_over_contiguous_keys(alibi: Option<&Alibi>) {
    let b = CpuBackend::new();
    let fx = PagedFixture::new(&b);
    let all: Vec<usize> = (0..fx.lens.len()).collect();
    let total: usize = fx.lens.iter().sum();
    let q = random(&b, 300, total, HEADS * HEAD_DIM);
    let run = |shuffled: bool| {
        let (tables, k, v) = fx.pools(&b, shuffled);
        b.paged_attention(
            &q,
            &k,
            &v,
            HEADS,
            &b.layout(&fx.layout(&tables, &all, None)),
            alibi,
        )
    };
    let (paged, in_order) = (run(true), run(false));
    assert_eq!(
        bits(&b, &paged),
        bits(&b, &in_order),
        "block order changed the result"
    );
    // Plain causal attention per sequence, in f64, over its contiguous K/V.
    let out = b.to_host(&paged);
    let qh = b.to_host(&q);
    let w = HEADS * HEAD_DIM;
    let mut row0 = 0;
    for (s, &n) in fx.lens.iter().enumerate() {
        let (k, v) = (b.to_host(&fx.k_rows[s]), b.to_host(&fx.v_rows[s]));
        for i in 0..n {
            for h in 0..HEADS {
                let qv = &qh[(row0 + i) * w + h * HEAD_DIM..][..HEAD_DIM];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kv = &k[j * w + h * HEAD_DIM..][..HEAD_DIM];
                        qv.iter()
                            .zip(kv)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (HEAD_DIM as f64).sqrt()
                            + alibi.map_or(0.0, |a| a.slope(h)) * (j as f64 - i as f64)
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..HEAD_DIM {
                    let want: f64 = (0..=i)
                        .map(|j| e[j] / sum * v[j * w + h * HEAD_DIM + d] as f64)
                        .sum();
                    let got = out[(row0 + i) * w + h * HEAD_DIM + d] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "{alibi:?} sequence {s} row {i} head {h} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
        row0 += n;
    }
}

#[test]
fn paged_attention_rows_do_not_depend_on_the_batch_or_the_chunk() {
    let b = CpuBackend::new();
    let fx = PagedFixture::new(&b);
    let (tables, k, v) = fx.pools(&b, true);
    let all: Vec<usize> = (0..fx.lens.len()).collect();
    let total: usize = fx.lens.iter().sum();
    let q = random(&b, 400, total, HEADS * HEAD_DIM);
    let full = b.paged_attention(
        &q,
        &k,
        &v,
        HEADS,
        &b.layout(&fx.layout(&tables, &all, None)), None,
    );
    let start_of = |s: usize| fx.lens[..s].iter().sum::<usize>();
    // Sequence 3 alone, then with sequence 1 before it: the same rows.
    for seqs in [vec![3], vec![1, 3]] {
        let q_part = seqs.iter().fold(b.zeros(0, HEADS * HEAD_DIM), |a, &s| {
            b.concat_rows(&a, &b.slice_rows(&q, start_of(s), fx.lens[s]))
        });
        let part = b.paged_attention(
            &q_part,
            &k,
            &v,
            HEADS,
            &b.layout(&fx.layout(&tables, &seqs, None)), None,
        );
        let offset = b.dims(&q_part).0 - fx.lens[3];
        assert_eq!(
            bits(&b, &b.slice_rows(&part, offset, fx.lens[3])),
            bits(&b, &b.slice_rows(&full, start_of(3), fx.lens[3])),
            "sequence 3 batched with {seqs:?}"
        );
    }
    // The last row of every sequence as a decode step (one query row each) equals that row of the full prefill.
    let last_rows: Vec<usize> = all.iter().map(|&s| start_of(s) + fx.lens[s] - 1).collect();
    let decode = b.paged_attention(
        &b.gather_rows(&q, &last_rows),
        &k,
        &v,
        HEADS,
        &b.layout(&fx.layout(&tables, &all, Some(1))), None,
    );
    assert_eq!(
        bits(&b, &decode),
        bits(&b, &b.gather_rows(&full, &last_rows)),
        "decode rows differ from the same rows of the prefill"
    );
}
