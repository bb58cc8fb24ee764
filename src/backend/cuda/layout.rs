//! The step layout on the device: a decoder step's rows, positions, KV slots, image slots and attention groups as
//! the kernels read them, uploaded once per step (or written into a recorded step's buffer before each replay).
//!
//! Paged self-attention splits a step's rows in two by the kind of position each is (never by the chunk it came
//! in, nor by what else is in the step), so a position's K/V are the same bits however the scheduler chunks,
//! preempts or serves it from the prefix cache: prompt rows (before [`SeqStep::decode_from`](crate::backend::SeqStep::decode_from)) run as prefill parts,
//! whose pages are gathered for one varlen `attention_d*` launch, and generated-token rows as decode parts of one
//! query each, which `paged_attention_d*` reads straight from the pools through the block tables (see
//! `ops/attention.rs`).

use std::sync::OnceLock;

use super::context::CudaBackend;
use super::memory::Buffer;
use crate::backend::{DecodeShape, StepLayout};

/// Rows of the step's activations, on the device, plus the first row when they are consecutive (then kernels read
/// and write the activations in place instead of through a gathered copy).
pub(in crate::backend::cuda) struct RowSet {
    pub(in crate::backend::cuda) idx: u64,
    pub(in crate::backend::cuda) n: usize,
    pub(in crate::backend::cuda) first: Option<usize>,
}

/// Consecutive rows of one sequence that one attention path computes: `q_rows` rows from step row `first_row`,
/// the last at position `kv_len - 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::backend::cuda) struct AttnPart {
    seq: usize,
    first_row: usize,
    q_rows: usize,
    kv_len: usize,
}

/// The step's rows as prefill parts (each sequence's prompt rows) and decode parts (one per generated-token row).
fn attention_parts(step: &StepLayout, starts: &[usize]) -> (Vec<AttnPart>, Vec<AttnPart>) {
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for (seq, (s, &start)) in step.seqs.iter().zip(starts).enumerate() {
        let first_pos = s.kv_len - s.q_rows;
        let prompt_rows = s.decode_from.clamp(first_pos, s.kv_len) - first_pos;
        if prompt_rows > 0 {
            prefill.push(AttnPart { seq, first_row: start, q_rows: prompt_rows, kv_len: first_pos + prompt_rows });
        }
        decode.extend((prompt_rows..s.q_rows).map(|r| AttnPart {
            seq,
            first_row: start + r,
            q_rows: 1,
            kv_len: first_pos + r + 1,
        }));
    }
    (prefill, decode)
}

/// Parts run through `attention_d*` as one varlen batch.
pub(in crate::backend::cuda) struct FlashGroup {
    pub(in crate::backend::cuda) rows: RowSet,
    pub(in crate::backend::cuda) seqs: usize,
    pub(in crate::backend::cuda) max_q: usize,
    pub(in crate::backend::cuda) cu_q: u64,
    pub(in crate::backend::cuda) cu_k: u64,
    /// Pool row of every key of every sequence, sequence after sequence.
    pub(in crate::backend::cuda) key_slots: u64,
    pub(in crate::backend::cuda) keys: usize,
    _buf: Buffer,
}

/// Decode parts as `paged_attention_d*` reads them.
pub(in crate::backend::cuda) struct DecodeGroup {
    pub(in crate::backend::cuda) rows: RowSet,
    pub(in crate::backend::cuda) kv_lens: u64,
    pub(in crate::backend::cuda) block_table: u64,
    pub(in crate::backend::cuda) max_blocks: usize,
    pub(in crate::backend::cuda) max_kv: usize,
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
    pub(in crate::backend::cuda) step: StepLayout,
    buf: Buffer,
    positions: usize,
    slots: usize,
    images: usize,
    max_slot: usize,
    pub(in crate::backend::cuda) prefill: Option<FlashGroup>,
    pub(in crate::backend::cuda) decode: Option<DecodeGroup>,
    decode_parts: Vec<AttnPart>,
    /// The decode parts as flash sequences, built on first use (head dims `paged_attention_d*` lacks).
    decode_flash: OnceLock<FlashGroup>,
}

/// A step's int32 arrays before upload, and where each part sits in them.
pub(in crate::backend::cuda) struct LayoutPlan {
    arrays: Arrays,
    positions: usize,
    slots: usize,
    images: usize,
    max_slot: usize,
    prefill_parts: Vec<AttnPart>,
    decode_parts: Vec<AttnPart>,
    decode: Option<DecodePlan>,
}

impl LayoutPlan {
    /// The arrays of `step`; with a `shape`, its decode sequences take that fixed geometry (a recorded step's).
    /// Errs when a decode sequence does not fit the `shape` (the step cannot be replayed from that recording).
    pub(in crate::backend::cuda) fn new(
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
        let (prefill_parts, decode_parts) = attention_parts(step, &starts);
        if shape.is_some() && !prefill_parts.is_empty() {
            return Err("a recorded decode step runs generated-token rows only".into());
        }
        let decode = match decode_parts.is_empty() {
            true => None,
            false => Some(plan_decode(&mut a, step, &decode_parts, shape)?),
        };
        Ok(LayoutPlan {
            arrays: a,
            positions,
            slots,
            images,
            max_slot,
            prefill_parts,
            decode_parts,
            decode,
        })
    }

    /// Appends the step's token ids (a recorded step's embedding reads them from the layout's buffer); returns
    /// their offset.
    pub(in crate::backend::cuda) fn push_ids(&mut self, ids: &[u32]) -> usize {
        self.arrays.push(ids.iter().map(|&i| i as usize))
    }

    pub(in crate::backend::cuda) fn arrays(&self) -> &[i32] {
        &self.arrays.0
    }
}

impl CudaLayout {
    pub(in crate::backend::cuda) fn new(b: &CudaBackend, step: &StepLayout) -> CudaLayout {
        let plan = LayoutPlan::new(step, None).expect("a step without a fixed shape always fits");
        let buf = b.upload_i32(plan.arrays());
        CudaLayout::from_plan(b, step, plan, buf)
    }

    /// The layout of `step` whose arrays `plan` are (or will be) in `buf`.
    pub(in crate::backend::cuda) fn from_plan(
        b: &CudaBackend,
        step: &StepLayout,
        plan: LayoutPlan,
        buf: Buffer,
    ) -> CudaLayout {
        let pre = &plan.prefill_parts;
        CudaLayout {
            prefill: (!pre.is_empty()).then(|| flash_group(b, step, pre)),
            decode: plan.decode.map(|p| p.resolve(&buf)),
            decode_parts: plan.decode_parts,
            decode_flash: OnceLock::new(),
            step: step.clone(),
            buf,
            positions: plan.positions,
            slots: plan.slots,
            images: plan.images,
            max_slot: plan.max_slot,
        }
    }

    /// The decode parts as one flash varlen batch (for head dims `paged_attention_d*` lacks), built once.
    pub(in crate::backend::cuda) fn decode_as_flash(&self, b: &CudaBackend) -> &FlashGroup {
        self.decode_flash
            .get_or_init(|| flash_group(b, &self.step, &self.decode_parts))
    }

    /// Device address of element `offset` of the layout's int32 arrays.
    pub(in crate::backend::cuda) fn array(&self, offset: usize) -> u64 {
        device_ptr(&self.buf, offset)
    }

    pub(in crate::backend::cuda) fn rows(&self) -> usize {
        self.step.rows()
    }

    pub(in crate::backend::cuda) fn positions(&self) -> u64 {
        device_ptr(&self.buf, self.positions)
    }

    pub(in crate::backend::cuda) fn slots(&self) -> u64 {
        device_ptr(&self.buf, self.slots)
    }

    pub(in crate::backend::cuda) fn images(&self) -> u64 {
        device_ptr(&self.buf, self.images)
    }

    /// Panics unless every slot of the step is a row of a pool of `pool_rows` rows.
    pub(in crate::backend::cuda) fn check_slots(&self, pool_rows: usize) {
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

/// The decode parts' arrays; a `shape` fixes the block-table width and the longest length (so the split count)
/// whatever the sequences' own, for a recorded step.
fn plan_decode(
    a: &mut Arrays,
    step: &StepLayout,
    parts: &[AttnPart],
    shape: Option<&DecodeShape>,
) -> Result<DecodePlan, String> {
    let rows: Vec<usize> = parts.iter().map(|p| p.first_row).collect();
    let table_of = |p: &AttnPart| &step.seqs[p.seq].block_table;
    let longest_table = parts.iter().map(|p| table_of(p).len()).max().unwrap_or(0);
    let longest = parts.iter().map(|p| p.kv_len).max().unwrap_or(0);
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
    let kv_lens = a.push(parts.iter().map(|p| p.kv_len));
    let table = parts.iter().flat_map(|p| {
        let t = table_of(p);
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

/// The attention `parts` of the step as one flash varlen batch, uploaded in its own buffer.
fn flash_group(b: &CudaBackend, step: &StepLayout, parts: &[AttnPart]) -> FlashGroup {
    let mut a = Arrays::default();
    let rows: Vec<usize> = parts
        .iter()
        .flat_map(|p| p.first_row..p.first_row + p.q_rows)
        .collect();
    let rows_at = a.push(rows.iter().copied());
    let cu_q = a.prefix_sums(parts.iter().map(|p| p.q_rows));
    let cu_k = a.prefix_sums(parts.iter().map(|p| p.kv_len));
    let key_slots = a.push(
        parts
            .iter()
            .flat_map(|p| (0..p.kv_len).map(move |pos| step.slot(p.seq, pos))),
    );
    let buf = b.upload_i32(&a.0);
    FlashGroup {
        rows: row_set(&rows, &buf, rows_at),
        seqs: parts.len(),
        max_q: parts.iter().map(|p| p.q_rows).max().unwrap_or(0),
        cu_q: device_ptr(&buf, cu_q),
        cu_k: device_ptr(&buf, cu_k),
        key_slots: device_ptr(&buf, key_slots),
        keys: parts.iter().map(|p| p.kv_len).sum(),
        _buf: buf,
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
                    decode_from: 0,
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
