//! A checkpoint tensor left where it is (in the memory map) and widened to f32 on demand.

use crate::io::safetensors::{DType, TensorRef};

pub struct CpuWeight {
    tensor: TensorRef,
    /// `[shape[0], product(rest)]`, or `[1, n]` for a vector.
    pub rows: usize,
    pub cols: usize,
}

impl CpuWeight {
    pub fn new(tensor: TensorRef) -> Self {
        let (rows, cols) = match tensor.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [r, rest @ ..] => (*r, rest.iter().product()),
        };
        CpuWeight { tensor, rows, cols }
    }

    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// The stored f32 values in place, when the tensor is f32 and 4-byte aligned in the mapping.
    pub fn as_f32(&self) -> Option<&[f32]> {
        if self.tensor.dtype != DType::F32 {
            return None;
        }
        bytemuck::try_cast_slice(self.tensor.bytes()).ok()
    }

    /// Widens rows `start .. start + out.len() / cols` into `out`.
    pub fn widen_rows(&self, start: usize, out: &mut [f32]) {
        let from = start * self.cols;
        widen(self.tensor.dtype, self.tensor.bytes(), from, out);
    }

    pub fn to_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.widen_rows(0, &mut out);
        out
    }
}

/// Elements `from .. from + out.len()` of a little-endian buffer of `dtype`, as f32.
fn widen(dtype: DType, bytes: &[u8], from: usize, out: &mut [f32]) {
    let size = dtype.size();
    let src = &bytes[from * size..(from + out.len()) * size];
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
    }
}
