//! `linear` (kernels/gemm.cu): `y = x W^T (+ bias)` by GEMV for steps of up to [`GEMV_MAX_ROWS`] rows (every
//! decode step), the small-tile tensor-core GEMM when the large tiles would not fill the GPU, the large-tile GEMM
//! above. Each kernel's reduction order depends on K only, and the two GEMMs give bit-identical rows, so a row's
//! result does not depend on the other rows of its step within each regime.

use crate::backend::cuda::context::{CudaBackend, CudaTensor, CudaWeight};
use crate::backend::cuda::launchers::{Epilogue, Gemm, GemmSmall, Gemv};

/// Steps of up to this many rows use the GEMV kernel for every linear layer.
pub const GEMV_MAX_ROWS: usize = 64;

pub(in crate::backend::cuda) fn linear(
    b: &CudaBackend,
    x: &CudaTensor,
    w: &CudaWeight,
    bias: Option<&CudaWeight>,
) -> CudaTensor {
    assert_eq!(
        x.cols, w.cols,
        "linear: input width {} but weight [{}, {}]",
        x.cols, w.rows, w.cols
    );
    let (m, n, k) = (x.rows, w.rows, w.cols);
    if let Some(bias) = bias {
        assert_eq!(
            bias.len(),
            n,
            "linear: bias of {} for {n} outputs",
            bias.len()
        );
    }
    let y = b.alloc(m, n);
    let epi = if bias.is_some() {
        Epilogue::Bias
    } else {
        Epilogue::None
    };
    let (y_ptr, x_ptr, w_ptr, bias_ptr) = (y.ptr(), x.ptr(), w.ptr, bias.map_or(0, |b| b.ptr));
    let tiles = |t: usize| (n.div_ceil(t) as u32, m.div_ceil(t) as u32, 1);
    macro_rules! gemm_args {
        ($kernel:ident) => {
            $kernel {
                y: y_ptr,
                x: x_ptr,
                w: w_ptr,
                bias: bias_ptr,
                aux: 0,
                m,
                n,
                k,
                ldy: n,
                epi,
            }
        };
    }
    if m <= GEMV_MAX_ROWS {
        let grid = (n.div_ceil(4) as u32, m.div_ceil(8) as u32, 1);
        b.run(&gemm_args!(Gemv), grid, 256);
    } else if (m.div_ceil(128) * n.div_ceil(128)) < b.sm_count {
        // Too few large tiles to fill the GPU; the small tiles give bit-identical results.
        b.run(&gemm_args!(GemmSmall), tiles(64), 128);
    } else {
        b.run(&gemm_args!(Gemm), tiles(128), 256);
    }
    y
}
