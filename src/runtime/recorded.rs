//! Recorded decode steps (CUDA graphs) as the engine uses them: a decode-only step is padded to the next power of
//! two of sequences, laid out in the fixed shape of the longest sequence possible, and run through the backend's
//! recording for its batch size (made the first time, replayed after).

use crate::backend::{Backend, DecodeShape, SeqStep, StepLayout};
use crate::cache::kv_cache::PagedKvCache;
use crate::cache::media_cache::MediaCache;
use crate::cache::pool::BlockPool;
use crate::error::Result;
use crate::runtime::pipeline::Pipeline;

/// Decode steps of up to this many sequences are recorded. Padding to the next power of two never crosses the CUDA
/// backend's regime boundary ([`GEMV_MAX_ROWS`](crate::backend::cuda::GEMV_MAX_ROWS) = 64: GEMV up to it, GEMM
/// above, and both GEMM kernels give bit-identical rows), so a padded step computes each real row exactly as an
/// eager step of its own size does.
pub const MAX_RECORDED_SEQS: usize = 256;

/// The fixed geometry of every recorded step: no sequence outgrows the model's context or the whole pool.
pub fn decode_shape(context_len: usize, blocks: &BlockPool) -> DecodeShape {
    let max_kv = context_len.min(blocks.total_blocks() * blocks.block_size());
    DecodeShape {
        table_width: blocks.blocks_for(max_kv),
        max_kv,
    }
}

/// A decode step of these rows padded to the next power of two with one-row sequences on the padding block `pad`,
/// so that every step of a batch size replays one recording. Returns the ids, the step and how many rows are real.
pub fn padded(
    mut ids: Vec<u32>,
    mut seqs: Vec<SeqStep>,
    block_size: usize,
    pad: u32,
) -> (Vec<u32>, StepLayout, usize) {
    let real = seqs.len();
    for _ in seqs.len()..seqs.len().next_power_of_two() {
        ids.push(0);
        seqs.push(SeqStep {
            q_rows: 1,
            kv_len: 1,
            block_table: vec![pad],
            image_of_row: vec![-1],
            decode_from: 0,
        });
    }
    (ids, StepLayout { block_size, seqs }, real)
}

/// The logits of every real row of a padded decode step, through the backend's recording for its batch size (made
/// on the first such step); block tables and attention splits take `shape`, that of the longest sequence possible.
pub fn recorded_logits<B: Backend>(
    p: &Pipeline<B>,
    graphs: &mut B::StepGraphs,
    (ids, step, real): (Vec<u32>, StepLayout, usize),
    shape: DecodeShape,
    kv: &mut PagedKvCache<B>,
    media: &MediaCache<B>,
) -> Result<B::Tensor> {
    let b = &p.backend;
    b.run_recorded(graphs, &ids, &step, shape, real, &mut |layout| {
        let h = p.model().forward(b, &ids, &step, layout, kv, media, None)?;
        Ok(p.model().logits(b, &h))
    })
}
