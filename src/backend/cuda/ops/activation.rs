//! Elementwise ops (kernels/activation.cu): `add_assign`, `add_gated` (IDEFICS's `tanh(alpha)` residual),
//! `activate`, `swiglu`, and the f32 widening sampling starts from. One thread per 8-column chunk.

use crate::backend::cuda::context::{CudaBackend, CudaTensor, CudaWeight};
use crate::backend::cuda::kernels::stride_grid;
use crate::backend::cuda::launchers::{
    Activate, AddAssign, AddGated, ToF32, Epilogue, Swiglu,
};
use crate::io::config::Activation;

/// Grid for the kernels of activation.cu: one thread per 8-column chunk.
fn chunk_grid(rows: usize, cols: usize) -> (u32, u32, u32) {
    stride_grid(rows * cols.div_ceil(8))
}

fn same_shape(a: &CudaTensor, b: &CudaTensor, what: &str) {
    assert_eq!(
        (a.rows, a.cols),
        (b.rows, b.cols),
        "{what}: tensors of different shapes"
    );
}

/// The epilogue code that applies `act` (common.cuh's `Epilogue`).
pub(in crate::backend::cuda) fn epilogue_of(act: Activation) -> Epilogue {
    match act {
        Activation::Gelu => Epilogue::Gelu,
        Activation::Relu => Epilogue::Relu,
        Activation::QuickGelu => Epilogue::QuickGelu,
        Activation::GeluTanh => Epilogue::GeluTanh,
    }
}

pub(in crate::backend::cuda) fn add_assign(b: &CudaBackend, acc: &mut CudaTensor, x: &CudaTensor) {
    same_shape(acc, x, "add_assign");
    let kernel = AddAssign {
        out: acc.ptr(),
        a: acc.ptr(),
        b: x.ptr(),
        rows: acc.rows,
        cols: acc.cols,
    };
    b.run(&kernel, chunk_grid(acc.rows, acc.cols), 256);
}

/// `acc += tanh(alpha) * x`, `alpha` one value or one per column.
pub(in crate::backend::cuda) fn add_gated(
    b: &CudaBackend,
    acc: &mut CudaTensor,
    x: &CudaTensor,
    alpha: &CudaWeight,
) {
    same_shape(acc, x, "add_gated");
    assert!(
        alpha.len() == 1 || alpha.len() == acc.cols,
        "gate of {} values for {} columns",
        alpha.len(),
        acc.cols
    );
    let kernel = AddGated {
        h: acc.ptr(),
        x: x.ptr(),
        alpha: alpha.ptr,
        alpha_len: alpha.len(),
        rows: acc.rows,
        cols: acc.cols,
    };
    b.run(&kernel, chunk_grid(acc.rows, acc.cols), 256);
}

pub(in crate::backend::cuda) fn activate(b: &CudaBackend, x: &mut CudaTensor, act: Activation) {
    let kernel = Activate {
        x: x.ptr(),
        rows: x.rows,
        cols: x.cols,
        act: epilogue_of(act),
    };
    b.run(&kernel, chunk_grid(x.rows, x.cols), 256);
}

/// LLaMA's MLP activation: `silu(gate) * up`.
pub(in crate::backend::cuda) fn swiglu(
    b: &CudaBackend,
    gate: &CudaTensor,
    up: &CudaTensor,
) -> CudaTensor {
    same_shape(gate, up, "swiglu");
    let out = b.alloc(gate.rows, gate.cols);
    let kernel = Swiglu {
        out: out.ptr(),
        gate: gate.ptr(),
        up: up.ptr(),
        rows: gate.rows,
        cols: gate.cols,
    };
    b.run(&kernel, chunk_grid(gate.rows, gate.cols), 256);
    out
}

/// `x` widened to f32 into `out` (exact), `n` values.
pub(in crate::backend::cuda) fn widen(b: &CudaBackend, out: u64, x: &CudaTensor) {
    let n = x.len();
    b.run(&ToF32 { out, x: x.ptr(), n }, stride_grid(n), 256);
}
