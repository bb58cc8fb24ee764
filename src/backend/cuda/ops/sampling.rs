//! `sample` on the device (kernels/sampling.cu): the logits stay on the GPU; each row's rule goes up as a few
//! small arrays, and only one id per row comes back.
//!
//! Per step: `to_f32_{bf16,f16}` widens the logits (exact), `ban_tokens_f32`, `penalize_tokens_f32` and
//! `offset_tokens_f32` apply the banned ids, the repetition penalty and OpenAI's additive adjustments (CSR lists
//! per row), and `sample_f32` picks each row's token (greedy or temperature / top-k / top-p with the row's uniform
//! draw), one block per row. The rows whose rule asks for log-probabilities come back adjusted, and their
//! log-softmax is computed on the host by the CPU reference (`cpu::sampling::token_logprobs`).

use cudarc::driver::result;

use super::activation::widen;
use crate::backend::cuda::context::{CudaBackend, CudaTensor};
use crate::backend::cuda::launchers::{BanTokensF32, OffsetTokensF32, PenalizeTokensF32, SampleF32};
use crate::backend::cpu::sampling::token_logprobs;
use crate::backend::{nothing_to_sample, RowSampling, Sampled};
use crate::error::Result;

/// The int32 and f32 arrays of one step's rules, laid out as the kernels read them.
struct RuleArrays {
    ints: Vec<i32>,
    floats: Vec<f32>,
    /// Offsets into `ints`: ban CSR offsets and ids, penalty CSR offsets and ids, logit offset CSR offsets and
    /// ids, top_k, output ids.
    ban_offsets: usize,
    ban_ids: usize,
    penalty_offsets: usize,
    penalty_ids: usize,
    offset_offsets: usize,
    offset_ids: usize,
    top_k: usize,
    out: usize,
    /// Whether any row has a repetition penalty (else that kernel is skipped).
    penalized: bool,
    /// Whether any row has logit offsets (else that kernel is skipped).
    offset: bool,
}

/// Offsets into `RuleArrays::floats`, each `rows` long: penalty, temperature, top_p, uniform; then
/// (`OFFSET_VALUES` rows in) the values of the logit offset lists, entry for entry with their ids.
const PENALTY: usize = 0;
const TEMPERATURE: usize = 1;
const TOP_P: usize = 2;
const UNIFORM: usize = 3;
const OFFSET_VALUES: usize = 4;

fn id(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(-1) // out of any vocabulary: the kernels ignore it
}

fn csr<'a>(ints: &mut Vec<i32>, lists: impl Iterator<Item = &'a [u32]> + Clone) -> (usize, usize) {
    let offsets = ints.len();
    let mut acc = 0;
    ints.push(0);
    for l in lists.clone() {
        acc += l.len();
        ints.push(i32::try_from(acc).expect("list lengths fit int32"));
    }
    let ids = ints.len();
    ints.extend(lists.flat_map(|l| l.iter().map(|&v| id(v))));
    (offsets, ids)
}

impl RuleArrays {
    fn new(rows: &[RowSampling]) -> RuleArrays {
        let mut ints = Vec::new();
        let (ban_offsets, ban_ids) = csr(&mut ints, rows.iter().map(|r| r.banned));
        let penalized = rows.iter().any(|r| r.repetition_penalty != 1.0);
        let seen = rows.iter().map(|r| {
            if r.repetition_penalty != 1.0 {
                r.seen
            } else {
                &[]
            }
        });
        let (penalty_offsets, penalty_ids) = csr(&mut ints, seen);
        let offset_lists: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| r.logit_offsets.iter().map(|o| o.0).collect())
            .collect();
        let (offset_offsets, offset_ids) = csr(&mut ints, offset_lists.iter().map(Vec::as_slice));
        let top_k = ints.len();
        ints.extend(rows.iter().map(|r| i32::try_from(r.top_k).unwrap_or(0)));
        let out = ints.len();
        ints.extend(std::iter::repeat_n(-1, rows.len()));
        let fields: [fn(&RowSampling) -> f32; 4] = [
            |r| r.repetition_penalty,
            |r| r.temperature,
            |r| r.top_p,
            |r| r.uniform,
        ];
        let floats = fields
            .iter()
            .flat_map(|f| rows.iter().map(f))
            .chain(rows.iter().flat_map(|r| r.logit_offsets.iter().map(|o| o.1)))
            .collect();
        RuleArrays {
            ints,
            floats,
            ban_offsets,
            ban_ids,
            penalty_offsets,
            penalty_ids,
            offset_offsets,
            offset_ids,
            top_k,
            out,
            penalized,
            offset: rows.iter().any(|r| !r.logit_offsets.is_empty()),
        }
    }
}

/// The next token of each row of `logits` by that row's rule; only the ids leave the device, and the adjusted
/// rows whose rule asks for log-probabilities.
pub(in crate::backend::cuda) fn sample(
    b: &CudaBackend,
    logits: &CudaTensor,
    rows: &[RowSampling],
) -> Result<Vec<Sampled>> {
    assert_eq!(
        logits.rows,
        rows.len(),
        "one sampling rule per row of logits"
    );
    let (n, vocab) = (rows.len(), logits.cols);
    if n == 0 {
        return Ok(Vec::new());
    }
    let a = RuleArrays::new(rows);
    let ints = b.upload_i32(&a.ints);
    let floats = b.pool().take(a.floats.len() * 4);
    b.htod(floats.ptr, &a.floats);
    let i = |offset: usize| ints.ptr + 4 * offset as u64;
    let f = |which: usize| floats.ptr + (4 * which * n) as u64;
    let x = b.scratch_f32(n * vocab);
    widen(b, x.ptr, logits);
    let ban = BanTokensF32 {
        logits: x.ptr,
        rows: n,
        vocab,
        ban_offsets: i(a.ban_offsets),
        ban_ids: i(a.ban_ids),
    };
    b.run(&ban, (n as u32, 1, 1), 32);
    if a.penalized {
        let penalize = PenalizeTokensF32 {
            logits: x.ptr,
            rows: n,
            vocab,
            offsets: i(a.penalty_offsets),
            ids: i(a.penalty_ids),
            penalty: f(PENALTY),
        };
        b.run(&penalize, (n as u32, 1, 1), 128);
    }
    if a.offset {
        let offset = OffsetTokensF32 {
            logits: x.ptr,
            rows: n,
            vocab,
            offsets: i(a.offset_offsets),
            ids: i(a.offset_ids),
            values: f(OFFSET_VALUES),
        };
        b.run(&offset, (n as u32, 1, 1), 128);
    }
    let choose = SampleF32 {
        out_ids: i(a.out),
        logits: x.ptr,
        rows: n,
        vocab,
        temperature: f(TEMPERATURE),
        top_k: i(a.top_k),
        top_p: f(TOP_P),
        uniform: f(UNIFORM),
    };
    b.run(&choose, (n as u32, 1, 1), 512);
    let mut ids = vec![0i32; n];
    b.bind();
    // SAFETY: the buffer holds `n` int32 ids at `out`; the stream is synchronised before `ids` is read.
    b.check("device-to-host copy", unsafe {
        result::memcpy_dtoh_async(&mut ids, i(a.out), b.stream.cu_stream())
    });
    b.synchronize();
    ids.iter()
        .enumerate()
        .map(|(r, &t)| {
            let token = u32::try_from(t).map_err(|_| nothing_to_sample(r))?;
            let logprobs = rows[r].logprobs.map(|top| {
                let row = b.dtoh_f32(x.ptr + (4 * r * vocab) as u64, vocab);
                token_logprobs(&row, token, top)
            });
            Ok(Sampled { token, logprobs })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arrays the kernels read: CSR lists per row (the penalty's only where a row has one), then top_k and
    /// the output slots; the floats field by field, each `rows` long.
    #[test]
    fn rules_are_laid_out_as_the_kernels_read_them() {
        let rule =
            |temperature, penalty, banned: &'static [u32], seen: &'static [u32]| RowSampling {
                temperature,
                top_k: 5,
                top_p: 0.9,
                repetition_penalty: penalty,
                banned,
                seen,
                logit_offsets: &[],
                uniform: 0.25,
                logprobs: None,
            };
        let rows = [
            rule(0.0, 1.0, &[3], &[1, 2]),
            RowSampling {
                logit_offsets: &[(7, -0.5), (2, 1.5)],
                ..rule(0.7, 1.2, &[], &[4, u32::MAX])
            },
        ];
        let a = RuleArrays::new(&rows);
        let at = |o: usize, n: usize| &a.ints[o..o + n];
        assert_eq!(at(a.ban_offsets, 3), [0, 1, 1]);
        assert_eq!(at(a.ban_ids, 1), [3]);
        // Row 0 has no penalty: its seen ids are not sent. An id beyond int32 becomes -1, which the kernel skips.
        assert_eq!(at(a.penalty_offsets, 3), [0, 0, 2]);
        assert_eq!(at(a.penalty_ids, 2), [4, -1]);
        assert_eq!(at(a.offset_offsets, 3), [0, 0, 2]);
        assert_eq!(at(a.offset_ids, 2), [7, 2]);
        assert!(a.offset);
        assert_eq!(&a.floats[OFFSET_VALUES * 2..], [-0.5, 1.5]);
        assert_eq!(at(a.top_k, 2), [5, 5]);
        assert_eq!(at(a.out, 2), [-1, -1]);
        assert_eq!(a.out + 2, a.ints.len());
        assert!(a.penalized);
        let f = |which: usize| &a.floats[which * 2..which * 2 + 2];
        assert_eq!(f(PENALTY), [1.0, 1.2]);
        assert_eq!(f(TEMPERATURE), [0.0, 0.7]);
        assert_eq!(f(TOP_P), [0.9, 0.9]);
        assert_eq!(f(UNIFORM), [0.25, 0.25]);
    }
}
