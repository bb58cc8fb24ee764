//! A checkpoint tensor left where it is (in the memory map) and widened to f32 on demand. For the matrix product
//! an f32 matrix is packed once (at load: `CpuBackend::load_weight`) into the product's panels (`dot::pack`), in
//! parallel with every thread; a 16-bit one is packed block by block as each product runs (`dot::pack_bits16`),
//! so that its memory stays the mapped file's.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::dot::{self, PANEL};
use crate::io::safetensors::{DType, TensorRef};

pub struct CpuWeight {
    tensor: TensorRef,
    /// `[shape[0], product(rest)]`, or `[1, n]` for a vector.
    pub rows: usize,
    pub cols: usize,
    /// An f32 weight's rows packed as panels of the product's right-hand side, made once.
    panels: OnceLock<Vec<f32>>,
}

impl CpuWeight {
    pub fn new(tensor: TensorRef) -> Self {
        let (rows, cols) = match tensor.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [r, rest @ ..] => (*r, rest.iter().product()),
        };
        CpuWeight { tensor, rows, cols, panels: OnceLock::new() }
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

    pub fn dtype(&self) -> DType {
        self.tensor.dtype
    }

    /// An f32 weight's rows as packed panels ([`dot::pack`]), made on the first call (a panel per task); `None`
    /// for a 16-bit weight ([`CpuWeight::pack_bits16`]).
    pub fn f32_panels(&self) -> Option<&[f32]> {
        if self.tensor.dtype != DType::F32 {
            return None;
        }
        Some(self.panels.get_or_init(|| match self.as_f32() {
            Some(stored) => self.pack_f32(|i| stored[i]),
            // Not 4-byte aligned in the mapping: read value by value.
            None => {
                let bytes = self.tensor.bytes();
                self.pack_f32(|i| f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]))
            }
        }))
    }

    /// The rows as f32 panels of `value(i)`, element `i` of the row-major matrix; a panel per task.
    fn pack_f32(&self, value: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
        let (k, per_panel) = (self.cols, self.cols * PANEL);
        let mut out = vec![0f32; self.rows.div_ceil(PANEL) * per_panel];
        out.par_chunks_mut(per_panel).enumerate().for_each(|(p, panel)| {
            let first = p * PANEL;
            dot::pack(|j, kk| value((first + j) * k + kk), k, PANEL.min(self.rows - first), panel);
        });
        out
    }

    /// Rows `start .. start + rows` of a 16-bit weight packed as panels of its bits into `out` (resized).
    pub fn pack_bits16(&self, start: usize, rows: usize, out: &mut Vec<u16>) {
        assert_eq!(self.tensor.dtype.size(), 2, "{}: a 16-bit weight", self.tensor.name);
        let k = self.cols;
        out.resize(rows.div_ceil(PANEL) * k * PANEL, 0);
        let bytes = &self.tensor.bytes()[2 * start * k..2 * (start + rows) * k];
        match bytemuck::try_cast_slice::<u8, u16>(bytes) {
            Ok(bits) if cfg!(target_endian = "little") => dot::pack_bits16(bits, k, rows, out),
            _ => dot::pack(|j, kk| u16::from_le_bytes([bytes[2 * (j * k + kk)], bytes[2 * (j * k + kk) + 1]]), k, rows, out),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::WeightStore;

    /// An f32 matrix whose data starts off a 4-byte boundary in the file (a header length safetensors allows) is
    /// packed all the same, value for value.
    #[test]
    fn an_unaligned_f32_matrix_is_packed_like_an_aligned_one() {
        let (rows, cols) = (19, 5);
        let values: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25 - 3.0).collect();
        let mut header = format!(r#"{{"w":{{"dtype":"F32","shape":[{rows},{cols}],"data_offsets":[0,{}]}}}}"#, 4 * values.len());
        while (8 + header.len()) % 4 == 0 {
            header.push(' ');
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        values.iter().for_each(|v| bytes.extend(v.to_le_bytes()));
        std::fs::write(&path, bytes).unwrap();
        let store = WeightStore::open_files(std::slice::from_ref(&path), "unaligned".into()).unwrap();
        let w = CpuWeight::new(store.get("w", &[rows, cols]).unwrap());
        assert!(w.as_f32().is_none(), "the test needs data off a 4-byte boundary");
        let mut want = vec![0f32; rows.div_ceil(PANEL) * cols * PANEL];
        dot::pack(|j, kk| values[j * cols + kk], cols, rows, &mut want);
        assert_eq!(w.f32_panels(), Some(&want[..]));
    }
}
