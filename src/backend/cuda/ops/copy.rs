//! Data movement (kernels/copy.cu and driver copies): host transfers, slices, concatenation, row gathers, KV-cache
//! writes and per-head padding. `copy_rows_bf16` does every strided or indexed copy; contiguous ranges are driver
//! device-to-device copies.

use cudarc::driver::result;

use crate::backend::cuda::context::{CudaBackend, CudaTensor, CudaWeight};
use crate::backend::cuda::kernels::stride_grid;
use crate::backend::cuda::launchers::CopyRows;
use crate::backend::cuda::layout::CudaLayout;

/// Launches `copy_rows_bf16` with `k`'s arguments, one thread per destination element.
pub(in crate::backend::cuda) fn copy_rows(b: &CudaBackend, k: CopyRows) {
    b.run(&k, stride_grid(k.rows * k.groups * k.d_dst), 256);
}

/// A copy of `rows` rows whose every row is one group `cols` wide: `dst` row `i` (or `dst_idx[i]`) gets `src`
/// row `i` (or `src_idx[i]`).
#[allow(clippy::too_many_arguments)]
fn copy_whole_rows(
    b: &CudaBackend,
    (dst, dst_idx, ld_dst): (u64, u64, usize),
    (src, src_idx, ld_src): (u64, u64, usize),
    rows: usize,
    cols: usize,
) {
    copy_rows(
        b,
        CopyRows {
            dst,
            src,
            dst_idx,
            src_idx,
            rows,
            groups: 1,
            d_dst: cols,
            d_src: cols,
            ld_dst,
            ld_src,
        },
    );
}

/// `t` with each of its `heads` column groups widened (zero-padded) or narrowed from `d_from` to `d_to`.
pub(in crate::backend::cuda) fn regroup(
    b: &CudaBackend,
    t: &CudaTensor,
    heads: usize,
    d_from: usize,
    d_to: usize,
) -> CudaTensor {
    let out = b.alloc(t.rows, heads * d_to);
    copy_rows(
        b,
        CopyRows {
            dst: out.ptr(),
            src: t.ptr(),
            dst_idx: 0,
            src_idx: 0,
            rows: t.rows,
            groups: heads,
            d_dst: d_to,
            d_src: d_from,
            ld_dst: heads * d_to,
            ld_src: t.cols,
        },
    );
    out
}

pub(in crate::backend::cuda) fn from_host(
    b: &CudaBackend,
    data: Vec<f32>,
    rows: usize,
    cols: usize,
) -> CudaTensor {
    assert_eq!(
        data.len(),
        rows * cols,
        "host data does not fill [{rows}, {cols}]"
    );
    let t = b.alloc(rows, cols);
    let bits: Vec<u16> = data.iter().map(|&v| b.act.encode(v)).collect();
    b.htod(t.ptr(), &bits);
    t
}

pub(in crate::backend::cuda) fn to_host(b: &CudaBackend, t: &CudaTensor) -> Vec<f32> {
    let mut raw = vec![0u16; t.len()];
    if !raw.is_empty() {
        b.bind();
        // SAFETY: the tensor holds t.len() 16-bit values; the stream is synchronised before `raw` is read.
        b.check("device-to-host copy", unsafe {
            result::memcpy_dtoh_async(&mut raw, t.ptr(), b.stream.cu_stream())
        });
        b.synchronize();
    }
    raw.into_iter().map(|v| b.act.decode(v)).collect()
}

pub(in crate::backend::cuda) fn weight_to_tensor(b: &CudaBackend, w: &CudaWeight) -> CudaTensor {
    let t = b.alloc(w.rows, w.cols);
    b.dtod(t.ptr(), w.ptr, w.len());
    t
}

pub(in crate::backend::cuda) fn zeros(b: &CudaBackend, rows: usize, cols: usize) -> CudaTensor {
    let t = b.alloc(rows, cols);
    if t.len() > 0 {
        b.bind();
        // SAFETY: the buffer holds t.len() 16-bit values.
        b.check("memset", unsafe {
            result::memset_d8_async(t.ptr(), 0, t.len() * 2, b.stream.cu_stream())
        });
    }
    t
}

pub(in crate::backend::cuda) fn slice_rows(
    b: &CudaBackend,
    t: &CudaTensor,
    start: usize,
    len: usize,
) -> CudaTensor {
    assert!(
        start + len <= t.rows,
        "rows {start}..{} of {}",
        start + len,
        t.rows
    );
    let out = b.alloc(len, t.cols);
    b.dtod(out.ptr(), t.row(start), out.len());
    out
}

pub(in crate::backend::cuda) fn concat_rows(
    b: &CudaBackend,
    top: &CudaTensor,
    bottom: &CudaTensor,
) -> CudaTensor {
    assert_eq!(
        top.cols, bottom.cols,
        "concatenating rows of different widths"
    );
    let out = b.alloc(top.rows + bottom.rows, top.cols);
    b.dtod(out.ptr(), top.ptr(), top.len());
    b.dtod(out.row(top.rows), bottom.ptr(), bottom.len());
    out
}

pub(in crate::backend::cuda) fn concat_cols(
    b: &CudaBackend,
    left: &CudaTensor,
    right: &CudaTensor,
) -> CudaTensor {
    assert_eq!(
        left.rows, right.rows,
        "concatenating columns of different heights"
    );
    let out = b.alloc(left.rows, left.cols + right.cols);
    copy_whole_rows(
        b,
        (out.ptr(), 0, out.cols),
        (left.ptr(), 0, left.cols),
        left.rows,
        left.cols,
    );
    let right_half = out.ptr() + (left.cols * 2) as u64;
    copy_whole_rows(
        b,
        (right_half, 0, out.cols),
        (right.ptr(), 0, right.cols),
        right.rows,
        right.cols,
    );
    out
}

pub(in crate::backend::cuda) fn write_rows(
    b: &CudaBackend,
    dst: &mut CudaTensor,
    row: usize,
    src: &CudaTensor,
) {
    assert_eq!(dst.cols, src.cols, "writing rows of a different width");
    assert!(
        row + src.rows <= dst.rows,
        "writing rows {row}..{} of {}",
        row + src.rows,
        dst.rows
    );
    b.dtod(dst.row(row), src.ptr(), src.len());
}

pub(in crate::backend::cuda) fn gather_rows(
    b: &CudaBackend,
    t: &CudaTensor,
    rows: &[usize],
) -> CudaTensor {
    let idx: Vec<i32> = rows
        .iter()
        .map(|&r| {
            assert!(r < t.rows, "gathering row {r} of {}", t.rows);
            r as i32
        })
        .collect();
    let out = b.alloc(rows.len(), t.cols);
    let idx = b.upload_i32(&idx);
    copy_whole_rows(
        b,
        (out.ptr(), 0, t.cols),
        (t.ptr(), idx.ptr, t.cols),
        rows.len(),
        t.cols,
    );
    out
}

/// The step's new K or V rows into their slots of a layer's pool.
pub(in crate::backend::cuda) fn write_kv(
    b: &CudaBackend,
    pool: &mut CudaTensor,
    layout: &CudaLayout,
    rows: &CudaTensor,
) {
    assert_eq!(pool.cols, rows.cols, "K/V rows and pool differ in width");
    assert_eq!(rows.rows, layout.rows(), "K/V rows do not match the step");
    layout.check_slots(pool.rows);
    let w = rows.cols;
    copy_whole_rows(
        b,
        (pool.ptr(), layout.slots(), w),
        (rows.ptr(), 0, w),
        rows.rows,
        w,
    );
}
