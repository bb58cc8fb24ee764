//! `attention` and `paged_attention` (kernels/attention.cu), and what the attention ops share: choosing a kernel's
//! head dim, and staging rows that are not in place.
//!
//! Paged self-attention splits a step's sequences by their own shape (see `layout.rs`): decode sequences go through
//! `paged_attention_d*` (flash-decoding straight from the pools, fixed split size) then
//! `paged_attention_combine_bf16`; prefill sequences have their pages gathered into contiguous K/V scratch and run
//! through `attention_d*` in one varlen launch (causal, queries at the end of their keys).
//!
//! Head dims a kernel lacks run zero-padded to the next one it has (padding q/k columns adds zero to every dot
//! product, padding v columns yields columns that are dropped), with the softmax scale of the real head dim;
//! decode sequences with a head dim `paged_attention_d*` lacks go through `attention_d*` as one-row sequences.
//!
//! Keys and values may have fewer heads than the queries (grouped-query attention, Llama 3.2 Vision): the kernels
//! read kv head `h / (heads / kv_heads)` for query head `h`.

use super::copy::{copy_rows, regroup};
use crate::backend::cuda::context::{CudaBackend, CudaTensor};
use crate::backend::cuda::launchers::Kernel;
use crate::backend::cuda::launchers::{
    Attention, CopyRows, PagedAttention, PagedAttentionCombine,
};
use crate::backend::cuda::layout::{CudaLayout, DecodeGroup, FlashGroup, RowSet};
use crate::io::config::Alibi;

/// Keys per flash-decoding split: fixed, so a row's reduction order depends on its own length only.
const DECODE_SPLIT: usize = 256;
/// Query rows per flash tile (`FLASH_BQ` in kernels/flash_common.cuh).
const FLASH_BQ: usize = 64;

/// The smallest head dim in `dims` (a kernel family's instantiations) that holds `d`.
pub(in crate::backend::cuda) fn kernel_dim(d: usize, dims: &[usize], what: &str) -> usize {
    *dims.iter().find(|&&k| k >= d).unwrap_or_else(|| {
        panic!(
            "{what}: head_dim {d} is over the kernels' largest, {}",
            dims[dims.len() - 1]
        )
    })
}

/// The softmax scale of head dim `d`.
pub(in crate::backend::cuda) fn scale(d: usize) -> f32 {
    (d as f32).powf(-0.5)
}

/// The device addresses of `ts` at head dim `dk`: each tensor itself when `dk` is its head dim `d`, else a
/// zero-padded copy, returned beside the addresses so it lives as long as the launch reading it.
pub(in crate::backend::cuda) fn padded<const N: usize>(
    b: &CudaBackend,
    ts: [&CudaTensor; N],
    heads: usize,
    d: usize,
    dk: usize,
) -> ([u64; N], Vec<CudaTensor>) {
    if d == dk {
        return (ts.map(|t| t.ptr()), Vec::new());
    }
    let copies: Vec<CudaTensor> = ts.iter().map(|t| regroup(b, t, heads, d, dk)).collect();
    (std::array::from_fn(|i| copies[i].ptr()), copies)
}

/// Launches a flash kernel over `rows` query rows of `heads` heads: one 128-thread block per 64-row tile per head.
pub(in crate::backend::cuda) fn run_query_tiles(
    b: &CudaBackend,
    kernel: &dyn Kernel,
    rows: usize,
    heads: usize,
) {
    b.run(
        kernel,
        (rows.div_ceil(FLASH_BQ) as u32, heads as u32, 1),
        128,
    );
}

/// `o` (head dim `dk`) narrowed back to head dim `d`.
pub(in crate::backend::cuda) fn unpadded(
    b: &CudaBackend,
    o: CudaTensor,
    heads: usize,
    d: usize,
    dk: usize,
) -> CudaTensor {
    if d == dk {
        o
    } else {
        regroup(b, &o, heads, dk, d)
    }
}

/// Key/value heads of pools `width` wide at head dim `d`, checked to divide the query heads.
fn kv_heads(heads: usize, d: usize, k: &CudaTensor, v: &CudaTensor, what: &str) -> usize {
    let kv = k.cols / d.max(1);
    assert!(
        d > 0 && k.cols == v.cols && k.cols % d == 0 && kv > 0 && heads % kv == 0,
        "{what}: {} query heads of {d} over keys {} and values {} wide",
        heads,
        k.cols,
        v.cols
    );
    kv
}

/// Full (non-causal) attention of `q` over all rows of `k`, `v` (vision encoder, cross-attention): one flash
/// varlen sequence.
pub(in crate::backend::cuda) fn attention(
    b: &CudaBackend,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    heads: usize,
) -> CudaTensor {
    assert!(heads > 0 && q.cols % heads == 0 && k.rows == v.rows, "attention: shapes");
    let d = q.cols / heads;
    let kv = kv_heads(heads, d, k, v, "attention");
    let dk = kernel_dim(d, Attention::D, "attention");
    let ([qp], _q_copy) = padded(b, [q], heads, d, dk);
    let ([kp, vp], _kv_copies) = padded(b, [k, v], kv, d, dk);
    let o = b.alloc(q.rows, heads * dk);
    let cu = b.upload_i32(&[0, q.rows as i32, 0, k.rows as i32]);
    let ld = heads * dk;
    let kernel = Attention {
        d: dk,
        o: o.ptr(),
        q: qp,
        k: kp,
        v: vp,
        cu_q: cu.ptr,
        cu_k: cu.ptr + 8,
        n_seqs: 1,
        n_heads: heads,
        n_kv_heads: kv,
        ldq: ld,
        ldk: kv * dk,
        ldv: kv * dk,
        ldo: ld,
        causal: 0,
        scale: scale(d),
        alibi_n: 0,
        alibi_max: 0.0,
        alibi_interleave: 0,
    };
    run_query_tiles(b, &kernel, q.rows, heads);
    unpadded(b, o, heads, d, dk)
}

/// Causal self-attention of the step's rows over their sequences' keys in the paged pools.
pub(in crate::backend::cuda) fn paged_attention(
    b: &CudaBackend,
    q: &CudaTensor,
    k_pool: &CudaTensor,
    v_pool: &CudaTensor,
    heads: usize,
    layout: &CudaLayout,
    alibi: Option<&Alibi>,
) -> CudaTensor {
    assert_eq!(q.rows, layout.rows(), "query rows do not match the step");
    assert!(heads > 0 && q.cols % heads == 0, "paged attention: widths");
    let out = b.alloc(q.rows, q.cols);
    let d = q.cols / heads;
    kv_heads(heads, d, k_pool, v_pool, "paged attention");
    if let Some(g) = &layout.prefill {
        gathered_attention(b, q, [k_pool, v_pool], heads, g, &out, alibi);
    }
    if let Some(g) = &layout.decode {
        if PagedAttention::D.contains(&d) {
            paged_decode(
                b,
                q,
                [k_pool, v_pool],
                heads,
                g,
                layout.step.block_size,
                &out,
                alibi,
            );
        } else {
            let fg = layout.decode_as_flash(b);
            gathered_attention(b, q, [k_pool, v_pool], heads, fg, &out, alibi);
        }
    }
    out
}

/// Causal flash attention of a group's rows over its sequences' keys, gathered from the pools.
fn gathered_attention(
    b: &CudaBackend,
    q: &CudaTensor,
    [k_pool, v_pool]: [&CudaTensor; 2],
    heads: usize,
    g: &FlashGroup,
    out: &CudaTensor,
    alibi: Option<&Alibi>,
) {
    let d = q.cols / heads;
    let kv = k_pool.cols / d;
    let dk = kernel_dim(d, Attention::D, "flash attention");
    let gather = |pool: &CudaTensor| {
        let t = b.alloc(g.keys, kv * dk);
        copy_rows(
            b,
            CopyRows {
                dst: t.ptr(),
                src: pool.ptr(),
                dst_idx: 0,
                src_idx: g.key_slots,
                rows: g.keys,
                groups: kv,
                d_dst: dk,
                d_src: d,
                ld_dst: kv * dk,
                ld_src: pool.cols,
            },
        );
        t
    };
    let (k, v) = (gather(k_pool), gather(v_pool));
    let s = stage(b, q, out, &g.rows, heads, d, dk);
    let ld = if s.o_copy.is_some() {
        heads * dk
    } else {
        q.cols
    };
    let kernel = Attention {
        d: dk,
        o: s.o,
        q: s.q,
        k: k.ptr(),
        v: v.ptr(),
        cu_q: g.cu_q,
        cu_k: g.cu_k,
        n_seqs: g.seqs,
        n_heads: heads,
        n_kv_heads: kv,
        ldq: ld,
        ldk: kv * dk,
        ldv: kv * dk,
        ldo: ld,
        causal: 1,
        scale: scale(d),
        alibi_n: alibi.map_or(0, |a| a.n),
        alibi_max: alibi.map_or(0.0, |a| a.bias_max as f32),
        alibi_interleave: alibi.is_some_and(|a| a.interleave) as usize,
    };
    let grid = (
        g.max_q.div_ceil(FLASH_BQ) as u32,
        heads as u32,
        g.seqs as u32,
    );
    b.run(&kernel, grid, 128);
    unstage(b, s, out, &g.rows, heads, d, dk);
}

/// Flash-decoding of one row per sequence straight from the paged pools.
fn paged_decode(
    b: &CudaBackend,
    q: &CudaTensor,
    [k_pool, v_pool]: [&CudaTensor; 2],
    heads: usize,
    g: &DecodeGroup,
    block_size: usize,
    out: &CudaTensor,
    alibi: Option<&Alibi>,
) {
    let d = q.cols / heads;
    let n = g.rows.n;
    let splits = g.max_kv.div_ceil(DECODE_SPLIT).max(1);
    let o_part = b.scratch_f32(n * heads * splits * d);
    let ml_part = b.scratch_f32(n * heads * splits * 2);
    let s = stage(b, q, out, &g.rows, heads, d, d);
    let kernel = PagedAttention {
        d,
        o_part: o_part.ptr,
        ml_part: ml_part.ptr,
        q: s.q,
        k_cache: k_pool.ptr(),
        v_cache: v_pool.ptr(),
        kv_lens: g.kv_lens,
        block_table: g.block_table,
        max_blocks: g.max_blocks,
        block_size,
        seq_stride: 0,
        n_heads: heads,
        n_kv_heads: k_pool.cols / d,
        ldq: q.cols,
        ldkv: k_pool.cols,
        split_size: DECODE_SPLIT,
        scale: scale(d),
        alibi_n: alibi.map_or(0, |a| a.n),
        alibi_max: alibi.map_or(0.0, |a| a.bias_max as f32),
        alibi_interleave: alibi.is_some_and(|a| a.interleave) as usize,
    };
    b.run(&kernel, (heads as u32, n as u32, splits as u32), 128);
    // Staged or in place, the output rows are q.cols wide (no padding on this path).
    let combine = PagedAttentionCombine {
        o: s.o,
        o_part: o_part.ptr,
        ml_part: ml_part.ptr,
        n_heads: heads,
        n_splits: splits,
        head_dim: d,
        ldo: q.cols,
    };
    b.run(&combine, (heads as u32, n as u32, 1), 128);
    unstage(b, s, out, &g.rows, heads, d, d);
}

/// Where a kernel reads a group's query rows and writes its output rows: the step's tensors in place when the rows
/// are consecutive and need no padding, else gathered (padded) copies that are scattered back afterwards.
struct Staged {
    q: u64,
    o: u64,
    _q_copy: Option<CudaTensor>,
    o_copy: Option<CudaTensor>,
}

fn stage(
    b: &CudaBackend,
    q: &CudaTensor,
    out: &CudaTensor,
    rows: &RowSet,
    heads: usize,
    d: usize,
    dk: usize,
) -> Staged {
    if let (Some(first), true) = (rows.first, d == dk) {
        return Staged {
            q: q.row(first),
            o: out.row(first),
            _q_copy: None,
            o_copy: None,
        };
    }
    let qc = b.alloc(rows.n, heads * dk);
    copy_rows(
        b,
        CopyRows {
            dst: qc.ptr(),
            src: q.ptr(),
            dst_idx: 0,
            src_idx: rows.idx,
            rows: rows.n,
            groups: heads,
            d_dst: dk,
            d_src: d,
            ld_dst: heads * dk,
            ld_src: q.cols,
        },
    );
    let oc = b.alloc(rows.n, heads * dk);
    Staged {
        q: qc.ptr(),
        o: oc.ptr(),
        _q_copy: Some(qc),
        o_copy: Some(oc),
    }
}

/// Scatters a staged output back into `out` (dropping padding); nothing to do when it was written in place.
fn unstage(
    b: &CudaBackend,
    s: Staged,
    out: &CudaTensor,
    rows: &RowSet,
    heads: usize,
    d: usize,
    dk: usize,
) {
    if let Some(oc) = &s.o_copy {
        copy_rows(
            b,
            CopyRows {
                dst: out.ptr(),
                src: oc.ptr(),
                dst_idx: rows.idx,
                src_idx: 0,
                rows: rows.n,
                groups: heads,
                d_dst: d,
                d_src: dk,
                ld_dst: out.cols,
                ld_src: heads * dk,
            },
        );
    }
}
