//! Attention on the device: the step layout (uploaded once per step) and the four attention ops.
//!
//! Paged self-attention splits a step's sequences in two, by their own shape only (so a row's path never depends
//! on what else is in the step):
//! - decode sequences (one new row): `decode_attn` reads K/V straight from the pools through the block tables
//!   (flash-decoding, fixed split size), then `decode_attn_combine`;
//! - prefill sequences (several rows): their pages are gathered into contiguous K/V scratch and `flash_attn` runs
//!   over all of them in one varlen launch (causal, queries at the end of their keys).
//!
//! Head dims a kernel lacks run zero-padded to the next one it has (padding q/k columns adds zero to every dot
//! product, padding v columns yields columns that are dropped), with the softmax scale of the real head dim;
//! decode sequences with a head dim `decode_attn` lacks (it has 16, 32, 64, 128) go through `flash_attn` as one-row
//! sequences.

use std::sync::OnceLock;

use super::kernels::{float, int, long, ptr};
use super::memory::Buffer;
use super::{CudaBackend, CudaTensor};
use crate::backend::{DecodeShape, StepLayout};

const FLASH_DIMS: &[usize] = &[64, 80, 96, 128];
pub(super) const DECODE_DIMS: &[usize] = &[16, 32, 64, 128];
const XATTN_DIMS: &[usize] = &[64, 128];
const RESAMPLER_DIMS: &[usize] = &[64, 96, 128];
/// Keys per flash-decoding split: fixed, so a row's reduction order depends on its own length only.
const DECODE_SPLIT: usize = 256;
/// Query rows per flash tile (`FLASH_BQ`).
const FLASH_BQ: usize = 64;

/// The smallest head dim in `dims` that holds `d`.
fn kernel_dim(d: usize, dims: &[usize], what: &str) -> usize {
    *dims.iter().find(|&&k| k >= d).unwrap_or_else(|| {
        panic!(
            "{what}: head_dim {d} is over the kernels' largest, {}",
            dims[dims.len() - 1]
        )
    })
}

/// Rows of the step's activations, on the device, plus the first row when they are consecutive (then kernels read
/// and write the activations in place instead of through a gathered copy).
struct RowSet {
    idx: u64,
    n: usize,
    first: Option<usize>,
}

/// Sequences run through `flash_attn` as one varlen batch.
struct FlashGroup {
    rows: RowSet,
    seqs: usize,
    max_q: usize,
    cu_q: u64,
    cu_k: u64,
    /// Pool row of every key of every sequence, sequence after sequence.
    key_slots: u64,
    keys: usize,
    _buf: Buffer,
}

/// Decode sequences as `decode_attn` reads them.
struct DecodeGroup {
    rows: RowSet,
    kv_lens: u64,
    block_table: u64,
    max_blocks: usize,
    max_kv: usize,
}

/// int32 arrays appended to one host vector, uploaded together.
#[derive(Default)]
struct Arrays(Vec<i32>);

impl Arrays {
    /// Appends `values`; returns their offset.
    fn push(&mut self, values: impl IntoIterator<Item = usize>) -> usize {
        let at = self.0.len();
        self.0.extend(
            values
                .into_iter()
                .map(|v| i32::try_from(v).expect("index fits int32")),
        );
        at
    }

    fn prefix_sums(&mut self, lens: impl Iterator<Item = usize>) -> usize {
        let mut acc = 0;
        self.push(std::iter::once(0).chain(lens.map(|l| {
            acc += l;
            acc
        })))
    }
}

fn device_ptr(buf: &Buffer, offset: usize) -> u64 {
    buf.ptr + 4 * offset as u64
}

fn row_set(rows: &[usize], buf: &Buffer, offset: usize) -> RowSet {
    let first = rows
        .first()
        .copied()
        .filter(|&f| rows.iter().enumerate().all(|(i, &r)| r == f + i));
    RowSet {
        idx: device_ptr(buf, offset),
        n: rows.len(),
        first,
    }
}

/// One decoder step as the kernels read it. Built once per step by [`Backend::layout`](crate::backend::Backend).
pub struct CudaLayout {
    step: StepLayout,
    /// Row index of each sequence's first row.
    starts: Vec<usize>,
    buf: Buffer,
    positions: usize,
    slots: usize,
    images: usize,
    max_slot: usize,
    prefill: Option<FlashGroup>,
    decode: Option<DecodeGroup>,
    /// The decode sequences as flash sequences, built on first use (head dims `decode_attn` lacks).
    decode_flash: OnceLock<FlashGroup>,
}

/// A step's int32 arrays before upload, and where each part sits in them.
pub(super) struct LayoutPlan {
    arrays: Arrays,
    starts: Vec<usize>,
    positions: usize,
    slots: usize,
    images: usize,
    max_slot: usize,
    decode: Option<DecodePlan>,
}

impl LayoutPlan {
    /// The arrays of `step`; with a `shape`, its decode sequences take that fixed geometry (a recorded step's).
    /// Errs when a decode sequence does not fit the `shape` (the step cannot be replayed from that recording).
    pub(super) fn new(
        step: &StepLayout,
        shape: Option<&DecodeShape>,
    ) -> Result<LayoutPlan, String> {
        let mut a = Arrays::default();
        let starts: Vec<usize> = step
            .seqs
            .iter()
            .scan(0, |r, s| Some(std::mem::replace(r, *r + s.q_rows)))
            .collect();
        let positions = a.push(step.row_positions().map(|(_, p)| p));
        let slot_list: Vec<usize> = step.row_positions().map(|(s, p)| step.slot(s, p)).collect();
        let max_slot = slot_list.iter().copied().max().unwrap_or(0);
        let slots = a.push(slot_list);
        let images = a.0.len();
        a.0.extend(
            step.seqs
                .iter()
                .flat_map(|s| s.image_of_row.iter().copied()),
        );
        let dec: Vec<usize> = (0..step.seqs.len())
            .filter(|&i| step.seqs[i].q_rows == 1)
            .collect();
        let decode = match dec.is_empty() {
            true => None,
            false => Some(plan_decode(&mut a, step, &starts, &dec, shape)?),
        };
        Ok(LayoutPlan {
            arrays: a,
            starts,
            positions,
            slots,
            images,
            max_slot,
            decode,
        })
    }

    /// Appends the step's token ids (a recorded step's embedding reads them from the layout's buffer); returns
    /// their offset.
    pub(super) fn push_ids(&mut self, ids: &[u32]) -> usize {
        self.arrays.push(ids.iter().map(|&i| i as usize))
    }

    pub(super) fn arrays(&self) -> &[i32] {
        &self.arrays.0
    }
}

impl CudaLayout {
    pub(super) fn new(b: &CudaBackend, step: &StepLayout) -> CudaLayout {
        let plan = LayoutPlan::new(step, None).expect("a step without a fixed shape always fits");
        let buf = b.upload_i32(plan.arrays());
        CudaLayout::from_plan(b, step, plan, buf)
    }

    /// The layout of `step` whose arrays `plan` are (or will be) in `buf`.
    pub(super) fn from_plan(
        b: &CudaBackend,
        step: &StepLayout,
        plan: LayoutPlan,
        buf: Buffer,
    ) -> CudaLayout {
        let pre: Vec<usize> = (0..step.seqs.len())
            .filter(|&i| step.seqs[i].q_rows != 1)
            .collect();
        CudaLayout {
            prefill: (!pre.is_empty()).then(|| flash_group(b, step, &plan.starts, &pre)),
            decode: plan.decode.map(|p| p.resolve(&buf)),
            decode_flash: OnceLock::new(),
            step: step.clone(),
            starts: plan.starts,
            buf,
            positions: plan.positions,
            slots: plan.slots,
            images: plan.images,
            max_slot: plan.max_slot,
        }
    }

    /// Device address of element `offset` of the layout's int32 arrays.
    pub(super) fn array(&self, offset: usize) -> u64 {
        device_ptr(&self.buf, offset)
    }

    pub(super) fn rows(&self) -> usize {
        self.step.rows()
    }

    pub(super) fn positions(&self) -> u64 {
        device_ptr(&self.buf, self.positions)
    }

    pub(super) fn slots(&self) -> u64 {
        device_ptr(&self.buf, self.slots)
    }

    fn images(&self) -> u64 {
        device_ptr(&self.buf, self.images)
    }

    /// Panics unless every slot of the step is a row of a pool of `pool_rows` rows.
    pub(super) fn check_slots(&self, pool_rows: usize) {
        assert!(
            self.rows() == 0 || self.max_slot < pool_rows,
            "KV slot {} is outside the pool of {pool_rows} rows",
            self.max_slot
        );
    }
}

/// Offsets of a decode group's arrays before upload.
struct DecodePlan {
    rows: Vec<usize>,
    rows_at: usize,
    kv_lens: usize,
    block_table: usize,
    max_blocks: usize,
    max_kv: usize,
}

impl DecodePlan {
    fn resolve(self, buf: &Buffer) -> DecodeGroup {
        DecodeGroup {
            rows: row_set(&self.rows, buf, self.rows_at),
            kv_lens: device_ptr(buf, self.kv_lens),
            block_table: device_ptr(buf, self.block_table),
            max_blocks: self.max_blocks,
            max_kv: self.max_kv,
        }
    }
}

/// The decode sequences' arrays; a `shape` fixes the block-table width and the longest length (so the split count)
/// whatever the sequences' own, for a recorded step.
fn plan_decode(
    a: &mut Arrays,
    step: &StepLayout,
    starts: &[usize],
    seqs: &[usize],
    shape: Option<&DecodeShape>,
) -> Result<DecodePlan, String> {
    let rows: Vec<usize> = seqs.iter().map(|&s| starts[s]).collect();
    let longest_table = seqs
        .iter()
        .map(|&s| step.seqs[s].block_table.len())
        .max()
        .unwrap_or(0);
    let longest = seqs.iter().map(|&s| step.seqs[s].kv_len).max().unwrap_or(0);
    let (max_blocks, max_kv) = match shape {
        Some(f) if longest_table > f.table_width || longest > f.max_kv => {
            return Err(format!(
                "a recorded decode step holds tables of {} blocks and {} positions at most, not {longest_table} and \
                 {longest}",
                f.table_width, f.max_kv
            ))
        }
        Some(f) => (f.table_width, f.max_kv),
        None => (longest_table.max(1), longest),
    };
    let rows_at = a.push(rows.iter().copied());
    let kv_lens = a.push(seqs.iter().map(|&s| step.seqs[s].kv_len));
    let table = seqs.iter().flat_map(|&s| {
        let t = &step.seqs[s].block_table;
        (0..max_blocks).map(move |j| t.get(j).map_or(0, |&b| b as usize))
    });
    let block_table = a.push(table);
    Ok(DecodePlan {
        rows,
        rows_at,
        kv_lens,
        block_table,
        max_blocks,
        max_kv,
    })
}

/// The sequences `seqs` of the step as one flash varlen batch, uploaded in its own buffer.
fn flash_group(b: &CudaBackend, step: &StepLayout, starts: &[usize], seqs: &[usize]) -> FlashGroup {
    let mut a = Arrays::default();
    let rows: Vec<usize> = seqs
        .iter()
        .flat_map(|&s| starts[s]..starts[s] + step.seqs[s].q_rows)
        .collect();
    let rows_at = a.push(rows.iter().copied());
    let cu_q = a.prefix_sums(seqs.iter().map(|&s| step.seqs[s].q_rows));
    let cu_k = a.prefix_sums(seqs.iter().map(|&s| step.seqs[s].kv_len));
    let key_slots = a.push(
        seqs.iter()
            .flat_map(|&s| (0..step.seqs[s].kv_len).map(move |p| step.slot(s, p))),
    );
    let buf = b.upload_i32(&a.0);
    FlashGroup {
        rows: row_set(&rows, &buf, rows_at),
        seqs: seqs.len(),
        max_q: seqs.iter().map(|&s| step.seqs[s].q_rows).max().unwrap_or(0),
        cu_q: device_ptr(&buf, cu_q),
        cu_k: device_ptr(&buf, cu_k),
        key_slots: device_ptr(&buf, key_slots),
        keys: seqs.iter().map(|&s| step.seqs[s].kv_len).sum(),
        _buf: buf,
    }
}

/// Where a kernel reads a group's query rows and writes its output rows: the step's tensors in place when the rows
/// are consecutive and need no padding, else gathered (padded) copies that are scattered back afterwards.
struct Staged {
    q: u64,
    o: u64,
    _q_copy: Option<CudaTensor>,
    o_copy: Option<CudaTensor>,
}

impl CudaBackend {
    fn stage(
        &self,
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
        let qc = self.alloc(rows.n, heads * dk);
        self.copy_rows(
            qc.ptr(),
            q.ptr(),
            0,
            rows.idx,
            rows.n,
            heads,
            (dk, d),
            (heads * dk, q.cols),
        );
        let oc = self.alloc(rows.n, heads * dk);
        Staged {
            q: qc.ptr(),
            o: oc.ptr(),
            _q_copy: Some(qc),
            o_copy: Some(oc),
        }
    }

    /// Scatters a staged output back into `out` (dropping padding); nothing to do when it was written in place.
    fn unstage(
        &self,
        s: Staged,
        out: &CudaTensor,
        rows: &RowSet,
        heads: usize,
        d: usize,
        dk: usize,
    ) {
        if let Some(oc) = &s.o_copy {
            self.copy_rows(
                out.ptr(),
                oc.ptr(),
                rows.idx,
                0,
                rows.n,
                heads,
                (d, dk),
                (out.cols, heads * dk),
            );
        }
    }

    pub(super) fn paged(
        &self,
        q: &CudaTensor,
        k_pool: &CudaTensor,
        v_pool: &CudaTensor,
        heads: usize,
        layout: &CudaLayout,
    ) -> CudaTensor {
        assert_eq!(q.rows, layout.rows(), "query rows do not match the step");
        assert!(
            heads > 0 && q.cols % heads == 0 && k_pool.cols == q.cols && v_pool.cols == q.cols,
            "paged attention: widths"
        );
        let out = self.alloc(q.rows, q.cols);
        let d = q.cols / heads;
        if let Some(g) = &layout.prefill {
            self.flash_paged(q, k_pool, v_pool, heads, g, &out);
        }
        if let Some(g) = &layout.decode {
            if DECODE_DIMS.contains(&d) {
                self.decode_paged(q, k_pool, v_pool, heads, g, layout.step.block_size, &out);
            } else {
                let fg = layout.decode_flash.get_or_init(|| {
                    let seqs: Vec<usize> = (0..layout.step.seqs.len())
                        .filter(|&s| layout.step.seqs[s].q_rows == 1)
                        .collect();
                    flash_group(self, &layout.step, &layout.starts, &seqs)
                });
                self.flash_paged(q, k_pool, v_pool, heads, fg, &out);
            }
        }
        out
    }

    /// Causal flash attention of a group's rows over its sequences' keys, gathered from the pools.
    fn flash_paged(
        &self,
        q: &CudaTensor,
        k_pool: &CudaTensor,
        v_pool: &CudaTensor,
        heads: usize,
        g: &FlashGroup,
        out: &CudaTensor,
    ) {
        let d = q.cols / heads;
        let dk = kernel_dim(d, FLASH_DIMS, "flash attention");
        let gather = |pool: &CudaTensor| {
            let t = self.alloc(g.keys, heads * dk);
            self.copy_rows(
                t.ptr(),
                pool.ptr(),
                0,
                g.key_slots,
                g.keys,
                heads,
                (dk, d),
                (heads * dk, pool.cols),
            );
            t
        };
        let (k, v) = (gather(k_pool), gather(v_pool));
        let s = self.stage(q, out, &g.rows, heads, d, dk);
        let ld = if s.o_copy.is_some() {
            heads * dk
        } else {
            q.cols
        };
        let args = [
            ptr(s.o),
            ptr(s.q),
            ptr(k.ptr()),
            ptr(v.ptr()),
            ptr(g.cu_q),
            ptr(g.cu_k),
            int(g.seqs),
            int(heads),
            int(heads),
            int(ld),
            int(heads * dk),
            int(heads * dk),
            int(ld),
            int(1),
            float((d as f32).powf(-0.5)),
        ];
        let grid = (
            g.max_q.div_ceil(FLASH_BQ) as u32,
            heads as u32,
            g.seqs as u32,
        );
        self.run(&format!("flash_attn_d{dk}_bf16"), grid, 128, &args);
        self.unstage(s, out, &g.rows, heads, d, dk);
    }

    /// Flash-decoding of one row per sequence straight from the paged pools.
    #[allow(clippy::too_many_arguments)]
    fn decode_paged(
        &self,
        q: &CudaTensor,
        k_pool: &CudaTensor,
        v_pool: &CudaTensor,
        heads: usize,
        g: &DecodeGroup,
        block_size: usize,
        out: &CudaTensor,
    ) {
        let d = q.cols / heads;
        let n = g.rows.n;
        let splits = g.max_kv.div_ceil(DECODE_SPLIT).max(1);
        let o_part = self.scratch_f32(n * heads * splits * d);
        let ml_part = self.scratch_f32(n * heads * splits * 2);
        let s = self.stage(q, out, &g.rows, heads, d, d);
        let args = [
            ptr(o_part.ptr),
            ptr(ml_part.ptr),
            ptr(s.q),
            ptr(k_pool.ptr()),
            ptr(v_pool.ptr()),
            ptr(g.kv_lens),
            ptr(g.block_table),
            int(g.max_blocks),
            int(block_size),
            long(0),
            int(heads),
            int(heads),
            int(q.cols),
            int(q.cols),
            int(DECODE_SPLIT),
            float((d as f32).powf(-0.5)),
        ];
        self.run(
            &format!("decode_attn_d{d}_bf16"),
            (heads as u32, n as u32, splits as u32),
            128,
            &args,
        );
        // Staged or in place, the output rows are q.cols wide (no padding on this path).
        let combine = [
            ptr(s.o),
            ptr(o_part.ptr),
            ptr(ml_part.ptr),
            int(heads),
            int(splits),
            int(d),
            int(q.cols),
        ];
        self.run(
            "decode_attn_combine_bf16",
            (heads as u32, n as u32, 1),
            128,
            &combine,
        );
        self.unstage(s, out, &g.rows, heads, d, d);
    }

    /// Full (non-causal) attention of `q` over all rows of `k`, `v` (vision encoder): one flash varlen sequence.
    pub(super) fn full_attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
    ) -> CudaTensor {
        assert!(
            heads > 0
                && q.cols % heads == 0
                && k.cols == q.cols
                && v.cols == q.cols
                && k.rows == v.rows,
            "attention: shapes"
        );
        let d = q.cols / heads;
        let dk = kernel_dim(d, FLASH_DIMS, "attention");
        let pad = |t: &CudaTensor| (dk != d).then(|| self.regroup(t, heads, d, dk));
        let (qp, kp, vp) = (pad(q), pad(k), pad(v));
        let o = self.alloc(q.rows, heads * dk);
        let cu = self.upload_i32(&[0, q.rows as i32, 0, k.rows as i32]);
        let ld = heads * dk;
        let args = [
            ptr(o.ptr()),
            ptr(qp.as_ref().unwrap_or(q).ptr()),
            ptr(kp.as_ref().unwrap_or(k).ptr()),
            ptr(vp.as_ref().unwrap_or(v).ptr()),
            ptr(cu.ptr),
            ptr(cu.ptr + 8),
            int(1),
            int(heads),
            int(heads),
            int(ld),
            int(ld),
            int(ld),
            int(ld),
            int(0),
            float((d as f32).powf(-0.5)),
        ];
        self.run(
            &format!("flash_attn_d{dk}_bf16"),
            (q.rows.div_ceil(FLASH_BQ) as u32, heads as u32, 1),
            128,
            &args,
        );
        self.unpad(o, heads, d, dk)
    }

    fn unpad(&self, o: CudaTensor, heads: usize, d: usize, dk: usize) -> CudaTensor {
        if d == dk {
            o
        } else {
            self.regroup(&o, heads, dk, d)
        }
    }

    /// IDEFICS gated cross-attention core: each row over the `per_image` keys of its media slot, -1 rows zero.
    pub(super) fn gated_cross(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
        layout: &CudaLayout,
        per_image: usize,
    ) -> CudaTensor {
        assert_eq!(q.rows, layout.rows(), "query rows do not match the step");
        assert!(
            heads > 0 && q.cols % heads == 0 && k.cols == q.cols && v.cols == q.cols,
            "cross-attention: widths"
        );
        assert!(
            per_image > 0 && k.rows % per_image == 0,
            "media pool of {} rows for {per_image} per image",
            k.rows
        );
        let d = q.cols / heads;
        let dk = kernel_dim(d, XATTN_DIMS, "cross-attention");
        let pad = |t: &CudaTensor| (dk != d).then(|| self.regroup(t, heads, d, dk));
        let (qp, kp, vp) = (pad(q), pad(k), pad(v));
        let o = self.alloc(q.rows, heads * dk);
        let ld = heads * dk;
        let args = [
            ptr(o.ptr()),
            ptr(qp.as_ref().unwrap_or(q).ptr()),
            ptr(kp.as_ref().unwrap_or(k).ptr()),
            ptr(vp.as_ref().unwrap_or(v).ptr()),
            ptr(layout.images()),
            int(q.rows),
            int(k.rows / per_image),
            int(per_image),
            int(heads),
            int(ld),
            int(ld),
            int(ld),
            ptr(0),
            float(0.0),
            float((d as f32).powf(-0.5)),
        ];
        self.run(
            &format!("gated_xattn_d{dk}_bf16"),
            (q.rows.div_ceil(FLASH_BQ) as u32, heads as u32, 1),
            128,
            &args,
        );
        self.unpad(o, heads, d, dk)
    }

    /// Perceiver attention of one image's latents over `[context ; latents]`, given as `[k_ctx, v_ctx, k_lat, v_lat]`.
    pub(super) fn perceiver(
        &self,
        q: &CudaTensor,
        kv: [&CudaTensor; 4],
        heads: usize,
    ) -> CudaTensor {
        let [k_ctx, v_ctx, k_lat, v_lat] = kv;
        assert!(
            heads > 0 && q.cols % heads == 0 && kv.iter().all(|t| t.cols == q.cols),
            "resampler attention: widths"
        );
        assert!(
            k_ctx.rows == v_ctx.rows && k_lat.rows == q.rows && v_lat.rows == q.rows,
            "resampler attention: rows"
        );
        let d = q.cols / heads;
        let dk = kernel_dim(d, RESAMPLER_DIMS, "resampler attention");
        let padded: Vec<Option<CudaTensor>> = std::iter::once(q)
            .chain(kv)
            .map(|t| (dk != d).then(|| self.regroup(t, heads, d, dk)))
            .collect();
        let p = |i: usize, t: &CudaTensor| padded[i].as_ref().unwrap_or(t).ptr();
        let o = self.alloc(q.rows, heads * dk);
        let ld = heads * dk;
        let args = [
            ptr(o.ptr()),
            ptr(p(0, q)),
            ptr(p(1, k_ctx)),
            ptr(p(2, v_ctx)),
            ptr(p(3, k_lat)),
            ptr(p(4, v_lat)),
            int(1),
            int(k_ctx.rows),
            int(q.rows),
            int(heads),
            int(ld),
            int(ld),
            int(ld),
            int(ld),
            ptr(0),
            ptr(0),
            ptr(0),
            ptr(0),
            float(0.0),
            float((d as f32).powf(-0.5)),
        ];
        self.run(
            &format!("resampler_attn_d{dk}_bf16"),
            (q.rows.div_ceil(FLASH_BQ) as u32, heads as u32, 1),
            128,
            &args,
        );
        self.unpad(o, heads, d, dk)
    }
}

#[cfg(test)]
mod tests {
    use super::LayoutPlan;
    use crate::backend::{DecodeShape, SeqStep, StepLayout};

    fn decode_step(lens: &[usize], block_size: usize) -> StepLayout {
        let mut next = 0u32;
        let seqs = lens
            .iter()
            .map(|&len| {
                let blocks = len.div_ceil(block_size) as u32;
                next += blocks;
                SeqStep {
                    q_rows: 1,
                    kv_len: len,
                    block_table: (next - blocks..next).collect(),
                    image_of_row: vec![-1],
                }
            })
            .collect();
        StepLayout { block_size, seqs }
    }

    /// A recorded step's arrays must sit at the same offsets with the same lengths whatever its sequences'
    /// lengths (a CUDA graph replays the kernels with the pointers and sizes of its recording), and carry each
    /// step's own values.
    #[test]
    fn a_fixed_shape_gives_every_step_of_a_size_the_same_geometry() {
        let shape = DecodeShape {
            table_width: 8,
            max_kv: 128,
        };
        let plan = |lens: &[usize]| {
            let mut p = LayoutPlan::new(&decode_step(lens, 16), Some(&shape)).unwrap();
            let ids_at = p.push_ids(&vec![7; lens.len()]);
            (p, ids_at)
        };
        let (a, a_ids) = plan(&[1, 40, 128]);
        let (b, b_ids) = plan(&[17, 3, 64]);
        assert_eq!(a.arrays().len(), b.arrays().len());
        assert_eq!(a_ids, b_ids);
        let (da, db) = (a.decode.as_ref().unwrap(), b.decode.as_ref().unwrap());
        assert_eq!(
            (
                da.rows_at,
                da.kv_lens,
                da.block_table,
                da.max_blocks,
                da.max_kv
            ),
            (
                db.rows_at,
                db.kv_lens,
                db.block_table,
                db.max_blocks,
                db.max_kv
            )
        );
        assert_eq!((da.max_blocks, da.max_kv), (8, 128));
        assert_ne!(a.arrays(), b.arrays(), "each step's own lengths and tables");
        // Unfixed, the geometry follows the step.
        let eager = LayoutPlan::new(&decode_step(&[1, 40], 16), None).unwrap();
        let d = eager.decode.as_ref().unwrap();
        assert_eq!((d.max_blocks, d.max_kv), (3, 40));
    }

    #[test]
    fn a_step_longer_than_its_shape_is_refused() {
        let shape = DecodeShape {
            table_width: 8,
            max_kv: 128,
        };
        let err = LayoutPlan::new(&decode_step(&[129], 16), Some(&shape)).err();
        assert_eq!(
            err.as_deref(),
            Some("a recorded decode step holds tables of 8 blocks and 128 positions at most, not 9 and 129")
        );
    }
}
