//! Batch-invariant register-tiled matrix products on x86-64: `out[r][c] = sum_kk x[r][kk] * b[kk][c]`, the
//! right-hand side read in panels of [`PANEL`] columns (`[k, PANEL]` each: the weights' packed panels, in their
//! stored f32, bf16 or f16 and widened as they are loaded, or windows of a row-major f32 `[k, cols]` matrix).
//!
//! Every output element is one chain of fused multiply-adds over `kk` in order, starting from zero, in a vector
//! lane or (for a column tail of a row-major right-hand side) a scalar `mul_add`, which rounds the same. So an
//! element depends only on its row of x and its column of b: not on the tile that computed it, how many rows share
//! the call, or the instruction set (AVX-512 and AVX2 give the same bits; `tests` checks both).
//!
//! Tiles broadcast one x value per row and kk against the panel's 16 values, keeping every accumulator in
//! registers: AVX-512 runs 12 rows x 2 panels (24 of the 32 zmm registers), AVX2 6 rows x 1 panel (12 of 16 ymm);
//! strips of fewer rows (a decode step's 1 or 2) take more panels at once, so that enough independent chains
//! cover the FMA latency.

use std::sync::OnceLock;

use super::activation;
use crate::io::config::Activation;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m256, __m512, _mm256_fmadd_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps, _mm512_fmadd_ps,
    _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps, _mm_prefetch, _MM_HINT_T1,
};

/// Columns per panel: one AVX-512 register, two AVX2 registers.
pub const PANEL: usize = 16;

/// The vector instructions a product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
}

/// The best instruction set this CPU has for [`product`], `None` without AVX2, FMA and F16C.
pub fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(detect)
}

fn detect() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return Some(Isa::Avx512);
        }
        let avx2 = std::is_x86_feature_detected!("avx2");
        if avx2 && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
            return Some(Isa::Avx2);
        }
    }
    None
}

/// A value a panel may hold: f32, or a 16-bit float widened to f32 (exactly) as it is loaded.
pub trait PanelValue: Copy + Default + Send + Sync {
    fn to_f32(self) -> f32;
    /// 16 values at `p` as one AVX-512 register.
    ///
    /// # Safety
    /// AVX-512F; 16 values readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> __m512;
    /// 8 values at `p` as one AVX2 register.
    ///
    /// # Safety
    /// AVX2 and F16C; 8 values readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;
}

impl PanelValue for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller's promise.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller's promise.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

/// bf16 is the top half of an f32: widened by a 16-bit shift.
impl PanelValue for half::bf16 {
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise: 32 bytes readable.
        unsafe {
            let bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise: 16 bytes readable.
        unsafe {
            let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits))
        }
    }
}

impl PanelValue for half::f16 {
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise: 32 bytes readable.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise: 16 bytes readable.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// The right-hand side `[k, cols]` of a product, as panels of [`PANEL`] columns of `T`.
#[derive(Clone, Copy)]
pub struct Rhs<'a, T = f32> {
    data: &'a [T],
    k: usize,
    cols: usize,
    /// Distance between rows kk and kk + 1 of a panel.
    row_stride: usize,
    /// Distance between panels.
    panel_stride: usize,
    /// Every panel is whole (zero-padded past `cols`), so a tile may read all of the last one.
    padded: bool,
    /// What is done with each sum as it is stored.
    epilogue: Epilogue<'a>,
}

/// What a product does with each element's sum as its tile is stored, while the tile is still in L1: add the
/// column's bias, apply an activation, then write the result or add it to what the output holds (a residual). The
/// same operations in the same order as separate passes over the output would run (`bias`, `activate`,
/// `add_assign`), so the same bits, without reading and writing the output again for each.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// `bias[c]` added to every sum of column `c`.
    pub bias: Option<&'a [f32]>,
    pub activation: Option<Activation>,
    /// `out += result` instead of `out = result`.
    pub accumulate: bool,
}

impl<'a, T: PanelValue> Rhs<'a, T> {
    /// Packed panels (see [`pack`]): `cols.div_ceil(PANEL)` panels of `[k, PANEL]`, the last zero-padded.
    pub fn packed(data: &'a [T], k: usize, cols: usize) -> Self {
        assert!(data.len() >= cols.div_ceil(PANEL) * k * PANEL, "packed panels of {cols} columns");
        Rhs { data, k, cols, row_stride: PANEL, panel_stride: k * PANEL, padded: true, epilogue: Epilogue::default() }
    }

    /// The same, with `epilogue` applied to each result as it is stored.
    pub fn with_epilogue(self, epilogue: Epilogue<'a>) -> Self {
        if let Some(b) = epilogue.bias {
            assert!(b.len() >= self.cols, "a bias of {} for {} columns", b.len(), self.cols);
        }
        Rhs { epilogue, ..self }
    }

    /// Panels a tile may read whole.
    fn whole_panels(&self) -> usize {
        if self.padded {
            self.cols.div_ceil(PANEL)
        } else {
            self.cols / PANEL
        }
    }

    fn at(&self, kk: usize, c: usize) -> f32 {
        self.data[c / PANEL * self.panel_stride + kk * self.row_stride + c % PANEL].to_f32()
    }
}

impl<'a> Rhs<'a, f32> {
    /// A row-major `[k, cols]` matrix, read in place.
    pub fn row_major(data: &'a [f32], k: usize, cols: usize) -> Self {
        assert!(data.len() >= k * cols, "a [{k}, {cols}] matrix");
        Rhs { data, k, cols, row_stride: cols, panel_stride: PANEL, padded: false, epilogue: Epilogue::default() }
    }
}

/// Packs `cols` rows of length `k` (the rows of W for `y = x W^T`; `value(j, kk)` is row j's element kk) into
/// `out` as panels of [`PANEL`] columns of W^T, `[k, PANEL]` each, the last zero-padded; `out` holds
/// `cols.div_ceil(PANEL) * k * PANEL`.
pub fn pack<T: Copy + Default>(value: impl Fn(usize, usize) -> T, k: usize, cols: usize, out: &mut [T]) {
    assert!(out.len() >= cols.div_ceil(PANEL) * k * PANEL);
    for (p, panel) in out.chunks_exact_mut(k * PANEL).take(cols.div_ceil(PANEL)).enumerate() {
        pack_panel(|j, kk| value(p * PANEL + j, kk), PANEL.min(cols - p * PANEL), 0, panel);
    }
}

/// Rows `kk0 ..` of one panel of `width` columns (zeros past them).
fn pack_panel<T: Copy + Default>(value: impl Fn(usize, usize) -> T, width: usize, kk0: usize, panel: &mut [T]) {
    for (kk, dst) in panel.chunks_exact_mut(PANEL).enumerate().skip(kk0) {
        for (c, v) in dst.iter_mut().enumerate() {
            *v = if c < width { value(c, kk) } else { T::default() };
        }
    }
}

/// [`pack`] of 16-bit values (bf16 or f16 bits; `rows` is `[cols, k]` row-major), fast enough to run per block
/// of every product (a decode step's included): 16 x 16 blocks are transposed in AVX2 registers.
pub fn pack_bits16(rows: &[u16], k: usize, cols: usize, out: &mut [u16]) {
    assert!(rows.len() >= cols * k && out.len() >= cols.div_ceil(PANEL) * k * PANEL);
    for (p, panel) in out.chunks_exact_mut(k * PANEL).take(cols.div_ceil(PANEL)).enumerate() {
        let width = PANEL.min(cols - p * PANEL);
        let first = &rows[p * PANEL * k..];
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if width == PANEL && isa().is_some() {
            done = k / 16 * 16;
            for kk0 in (0..done).step_by(16) {
                // SAFETY: the CPU has AVX2; 16 rows of 16 values at kk0 are in `first` (width == PANEL), and the
                // panel's rows kk0 .. kk0 + 16 are in `panel`.
                unsafe { transpose16(first[kk0..].as_ptr(), k, panel[kk0 * PANEL..].as_mut_ptr()) };
            }
        }
        pack_panel(|j, kk| first[j * k + kk], width, done, panel);
    }
}

/// `dst[i * 16 + j] = src[j * stride + i]` for `i, j < 16`.
///
/// # Safety
/// AVX2; 16 values readable at `src + j * stride` for `j < 16`, 256 writable at `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose16(src: *const u16, stride: usize, dst: *mut u16) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_permute2x128_si256, _mm256_storeu_si256};
    // SAFETY: the caller's promise.
    let rows: [__m256i; 16] = std::array::from_fn(|j| unsafe { _mm256_loadu_si256(src.add(j * stride).cast()) });
    let top = transpose8_in_lanes(rows[..8].try_into().expect("8 rows"));
    let bottom = transpose8_in_lanes(rows[8..].try_into().expect("8 rows"));
    for i in 0..8 {
        // Column i of rows 0..8 and of rows 8..16 sit in the low lanes, column 8 + i in the high ones.
        let (low, high) = (
            _mm256_permute2x128_si256::<0x20>(top[i], bottom[i]),
            _mm256_permute2x128_si256::<0x31>(top[i], bottom[i]),
        );
        // SAFETY: rows i and 8 + i of the 16 x 16 output.
        unsafe {
            _mm256_storeu_si256(dst.add(i * 16).cast(), low);
            _mm256_storeu_si256(dst.add((8 + i) * 16).cast(), high);
        }
    }
}

/// Transposes 8 rows of 8 16-bit values in each 128-bit lane: output `i` holds column `i` of the rows' low
/// halves in its low lane and column `8 + i` of their high halves in its high lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose8_in_lanes(a: [std::arch::x86_64::__m256i; 8]) -> [std::arch::x86_64::__m256i; 8] {
    use std::arch::x86_64::*;
    // SAFETY: only called from `transpose16`, which runs with AVX2.
    unsafe {
        let b = [
            _mm256_unpacklo_epi16(a[0], a[1]),
            _mm256_unpackhi_epi16(a[0], a[1]),
            _mm256_unpacklo_epi16(a[2], a[3]),
            _mm256_unpackhi_epi16(a[2], a[3]),
            _mm256_unpacklo_epi16(a[4], a[5]),
            _mm256_unpackhi_epi16(a[4], a[5]),
            _mm256_unpacklo_epi16(a[6], a[7]),
            _mm256_unpackhi_epi16(a[6], a[7]),
        ];
        let c = [
            _mm256_unpacklo_epi32(b[0], b[2]),
            _mm256_unpackhi_epi32(b[0], b[2]),
            _mm256_unpacklo_epi32(b[1], b[3]),
            _mm256_unpackhi_epi32(b[1], b[3]),
            _mm256_unpacklo_epi32(b[4], b[6]),
            _mm256_unpackhi_epi32(b[4], b[6]),
            _mm256_unpacklo_epi32(b[5], b[7]),
            _mm256_unpackhi_epi32(b[5], b[7]),
        ];
        [
            _mm256_unpacklo_epi64(c[0], c[4]),
            _mm256_unpackhi_epi64(c[0], c[4]),
            _mm256_unpacklo_epi64(c[1], c[5]),
            _mm256_unpackhi_epi64(c[1], c[5]),
            _mm256_unpacklo_epi64(c[2], c[6]),
            _mm256_unpackhi_epi64(c[2], c[6]),
            _mm256_unpacklo_epi64(c[3], c[7]),
            _mm256_unpackhi_epi64(c[3], c[7]),
        ]
    }
}

/// `out[r * ld + c] = x[r] . b[:, c]` for `r < m`, `c < b.cols`, through `b`'s epilogue; `x` is `[m, b.k]`
/// row-major.
///
/// # Safety
/// The CPU must have `isa` ([`isa`]); `out` must be valid for reads and writes at `r * ld + c` for every `r < m`,
/// `c < b.cols` (and hold initialised values there when the epilogue accumulates).
#[cfg(target_arch = "x86_64")]
pub unsafe fn product<T: PanelValue>(isa: Isa, x: &[f32], m: usize, b: &Rhs<T>, out: *mut f32, ld: usize) {
    let k = b.k;
    assert!(x.len() >= m * k);
    let whole = b.whole_panels();
    let mut r = 0;
    while r < m {
        let rows = (m - r).min(strip_rows(isa));
        let xs = &x[r * k..(r + rows) * k];
        // SAFETY: rows r .. r + rows of the output, within the caller's promise; the CPU has `isa`.
        unsafe {
            let out = out.add(r * ld);
            match isa {
                Isa::Avx512 => avx512_strip(xs, rows, b, whole, out, ld),
                Isa::Avx2 => avx2_strip(xs, rows, b, whole, out, ld),
            }
            scalar_columns(xs, rows, b, whole * PANEL, out, ld);
        }
        r += rows;
    }
}

#[cfg(target_arch = "x86_64")]
fn strip_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 12,
        Isa::Avx2 => 6,
    }
}

/// Columns `from ..` of a strip that no panel covers whole (a row-major right-hand side's tail), in scalar
/// `mul_add` chains.
///
/// # Safety
/// `out` valid for `rows` rows of `b.cols` at stride `ld`.
#[cfg(target_arch = "x86_64")]
unsafe fn scalar_columns<T: PanelValue>(xs: &[f32], rows: usize, b: &Rhs<T>, from: usize, out: *mut f32, ld: usize) {
    for c in from..b.cols {
        for i in 0..rows {
            let xi = &xs[i * b.k..(i + 1) * b.k];
            let mut s = [(0..b.k).fold(0f32, |s, kk| xi[kk].mul_add(b.at(kk, c), s))];
            // SAFETY: row i < rows, column c < cols.
            unsafe { finish(&b.epilogue, c, &mut s, out.add(i * ld + c)) };
        }
    }
}

/// Stores a tile of columns `c0 ..` through the epilogue: only their first `cols` columns (the rest are a padded
/// panel's zeros).
///
/// # Safety
/// `out` valid for the tile's rows of `cols.min(W)` at stride `ld`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_tile<const W: usize>(tile: &mut [[f32; W]], e: &Epilogue, c0: usize, cols: usize, out: *mut f32, ld: usize) {
    let cols = cols.min(W);
    for (i, row) in tile.iter_mut().enumerate() {
        // SAFETY: within the caller's promise.
        unsafe { finish(e, c0, &mut row[..cols], out.add(i * ld)) };
    }
}

/// Runs the epilogue on `sums`, one output row's results for columns `c0 ..`, and stores them at `out`.
///
/// # Safety
/// `out` valid for reads and writes of `sums.len()` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn finish(e: &Epilogue, c0: usize, sums: &mut [f32], out: *mut f32) {
    // SAFETY: the caller's promise.
    finish_row(e, c0, sums, unsafe { std::slice::from_raw_parts_mut(out, sums.len()) });
}

/// Runs the epilogue on `sums`, one output row's results for columns `c0 ..`, and stores them in `dst`.
#[inline(always)]
pub fn finish_row(e: &Epilogue, c0: usize, sums: &mut [f32], dst: &mut [f32]) {
    // `for` loops, which inline into the caller's vector features (see `activation::activate_all`).
    if let Some(bias) = e.bias {
        for (v, b) in sums.iter_mut().zip(&bias[c0..]) {
            *v += b;
        }
    }
    if let Some(act) = e.activation {
        activation::activate_all(sums, act);
    }
    if e.accumulate {
        for (o, v) in dst.iter_mut().zip(sums.iter()) {
            *o += v;
        }
    } else {
        dst.copy_from_slice(sums);
    }
}

/// Runs `tile::<R, P, P * PANEL>` over the whole panels of one strip, `P` at a time, the rest one by one; each
/// tile is computed into a buffer and stored up to `b.cols` (the padded last panel's zeros are dropped).
macro_rules! strip_of_panels {
    ($tile:ident, $xs:expr, $b:expr, $whole:expr, $out:expr, $ld:expr, $R:literal, $P:literal) => {{
        let (xs, b, whole, out, ld): (&[f32], &Rhs<T>, usize, *mut f32, usize) = ($xs, $b, $whole, $out, $ld);
        let mut p = 0;
        while p < whole {
            let at = b.data[p * b.panel_stride..].as_ptr();
            let c0 = p * PANEL;
            // SAFETY: xs holds R rows of k, panels p .. are readable whole (`whole`), and the output's rows and
            // columns c0 .. cols are within the caller's promise.
            unsafe {
                if p + $P <= whole {
                    let mut acc = [[0f32; { $P * PANEL }]; $R];
                    $tile::<T, $R, $P, { $P * PANEL }>(xs.as_ptr(), b.k, at, b.row_stride, b.panel_stride, &mut acc);
                    store_tile(&mut acc, &b.epilogue, c0, b.cols - c0, out.add(c0), ld);
                    p += $P;
                } else {
                    let mut acc = [[0f32; PANEL]; $R];
                    $tile::<T, $R, 1, PANEL>(xs.as_ptr(), b.k, at, b.row_stride, b.panel_stride, &mut acc);
                    store_tile(&mut acc, &b.epilogue, c0, b.cols - c0, out.add(c0), ld);
                    p += 1;
                }
            }
        }
    }};
}

/// Picks the tile for a strip of `rows` rows: `R => P` gives the panels per tile for each row count.
macro_rules! dispatch_rows {
    ($tile:ident, $xs:expr, $rows:expr, $b:expr, $whole:expr, $out:expr, $ld:expr; $($R:literal => $P:literal),*) => {
        match $rows {
            $($R => strip_of_panels!($tile, $xs, $b, $whole, $out, $ld, $R, $P),)*
            _ => unreachable!("a strip has 1 ..= strip_rows rows"),
        }
    };
}


/// One strip of `rows` rows (1 ..= 12) over the first `whole` panels.
///
/// # Safety
/// AVX-512F; `out` valid for `rows` rows of `b.cols` at stride `ld`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_strip<T: PanelValue>(xs: &[f32], rows: usize, b: &Rhs<T>, whole: usize, out: *mut f32, ld: usize) {
    dispatch_rows!(avx512_tile, xs, rows, b, whole, out, ld;
        1 => 8, 2 => 8, 3 => 4, 4 => 4, 5 => 4, 6 => 4, 7 => 2, 8 => 2, 9 => 2, 10 => 2, 11 => 2, 12 => 2)
}

/// `R` rows x `P` panels: one zmm accumulator per row and panel.
///
/// # Safety
/// AVX-512F; `x` holds `R` rows of `k`, `b` `P` panels of `k` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // indexed loops over the const-sized tile keep it in registers
unsafe fn avx512_tile<T: PanelValue, const R: usize, const P: usize, const W: usize>(
    x: *const f32,
    k: usize,
    b: *const T,
    row_stride: usize,
    panel_stride: usize,
    out: &mut [[f32; W]; R],
) {
    let mut acc: [[__m512; P]; R] = [[_mm512_setzero_ps(); P]; R];
    for kk in 0..k {
        // SAFETY: kk < k rows of P panels, and R rows of k values of x (the caller's promise).
        let bv: [__m512; P] =
            std::array::from_fn(|p| unsafe { T::load16(b.add(p * panel_stride + kk * row_stride)) });
        // The next tile's panels, the same row: a strip's first pass over a block streams its weights from memory
        // (a 65-row prefill's weights do not stay in cache between calls), and this keeps twice the streams in
        // flight (`flamingo profile`, cpu-mid, on a noisy VM: the 65-row linears at 53-81% of the GEMM ceiling
        // without it, 72-99% with it).
        // A prefetch never faults, so past the last panel it is only wasted.
        for p in 0..P {
            let ahead = b.wrapping_add((P + p) * panel_stride + kk * row_stride);
            _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
        }
        for i in 0..R {
            let a = _mm512_set1_ps(unsafe { *x.add(i * k + kk) });
            for p in 0..P {
                acc[i][p] = _mm512_fmadd_ps(a, bv[p], acc[i][p]);
            }
        }
    }
    for i in 0..R {
        for p in 0..P {
            // SAFETY: 16 floats at column 16p of a row of P * 16.
            unsafe { _mm512_storeu_ps(out[i].as_mut_ptr().add(p * PANEL), acc[i][p]) };
        }
    }
}

/// One strip of `rows` rows (1 ..= 6) over the first `whole` panels.
///
/// # Safety
/// AVX2, FMA and F16C; `out` valid for `rows` rows of `b.cols` at stride `ld`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_strip<T: PanelValue>(xs: &[f32], rows: usize, b: &Rhs<T>, whole: usize, out: *mut f32, ld: usize) {
    dispatch_rows!(avx2_tile, xs, rows, b, whole, out, ld; 1 => 4, 2 => 2, 3 => 1, 4 => 1, 5 => 1, 6 => 1)
}

/// `R` rows x `P` panels: two ymm accumulators per row and panel.
///
/// # Safety
/// AVX2, FMA and F16C; `x` holds `R` rows of `k`, `b` `P` panels of `k` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // indexed loops over the const-sized tile keep it in registers
unsafe fn avx2_tile<T: PanelValue, const R: usize, const P: usize, const W: usize>(
    x: *const f32,
    k: usize,
    b: *const T,
    row_stride: usize,
    panel_stride: usize,
    out: &mut [[f32; W]; R],
) {
    let mut acc: [[[__m256; 2]; P]; R] = [[[_mm256_setzero_ps(); 2]; P]; R];
    for kk in 0..k {
        // SAFETY: kk < k rows of P panels, and R rows of k values of x (the caller's promise).
        let bv: [[__m256; 2]; P] = std::array::from_fn(|p| {
            let at = unsafe { b.add(p * panel_stride + kk * row_stride) };
            std::array::from_fn(|h| unsafe { T::load8(at.add(8 * h)) })
        });
        for i in 0..R {
            let a = _mm256_set1_ps(unsafe { *x.add(i * k + kk) });
            for p in 0..P {
                for h in 0..2 {
                    acc[i][p][h] = _mm256_fmadd_ps(a, bv[p][h], acc[i][p][h]);
                }
            }
        }
    }
    for i in 0..R {
        for p in 0..P {
            for h in 0..2 {
                // SAFETY: 8 floats at column 16p + 8h of a row of P * 16.
                unsafe { _mm256_storeu_ps(out[i].as_mut_ptr().add(p * PANEL + 8 * h), acc[i][p][h]) };
            }
        }
    }
}
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 * 1e-3 - 1.0)
            .collect()
    }

    /// Both right-hand side forms, every strip height and column tail, on every instruction set this CPU has,
    /// against an f64 reference; every row equal (bit for bit) to the same row computed alone, and every
    /// instruction set and form equal to the others.
    #[test]
    fn products_match_f64_and_rows_depend_on_nothing_else() {
        let isas = isas();
        if isas.is_empty() {
            eprintln!("skipped: no AVX2, FMA and F16C");
            return;
        }
        for (m, k, cols) in [(1, 1, 1), (7, 13, 9), (13, 64, 41), (25, 257, 16), (5, 8, 24), (2, 3, 7), (3, 70, 200)] {
            let x = values(m * k, m);
            let wt = values(k * cols, cols); // [k, cols]
            let mut panels = vec![f32::NAN; cols.div_ceil(PANEL) * k * PANEL];
            pack(|j, kk| wt[kk * cols + j], k, cols, &mut panels);
            let mut results = Vec::new();
            for &isa in &isas {
                for (form, b) in [("packed", Rhs::packed(&panels, k, cols)), ("row-major", Rhs::row_major(&wt, k, cols))] {
                    let all = run(isa, &x, m, &b);
                    check_epilogues(isa, &x, m, &b, &all);
                    for r in 0..m {
                        let alone = run(isa, &x[r * k..(r + 1) * k], 1, &b);
                        assert_eq!(alone, all[r * cols..(r + 1) * cols], "{isa:?} {form} {m}x{k}x{cols} row {r}");
                        for c in 0..cols {
                            let want: f64 = (0..k).map(|kk| x[r * k + kk] as f64 * wt[kk * cols + c] as f64).sum();
                            let got = all[r * cols + c] as f64;
                            assert!((got - want).abs() < 1e-4 * k as f64, "{isa:?} {form} {m}x{k}x{cols}: {got} vs {want}");
                        }
                    }
                    results.push(all);
                }
            }
            assert!(results.windows(2).all(|w| w[0] == w[1]), "{m}x{k}x{cols}: the same bits on every path");
        }
    }

    /// Panels of bf16 and f16 give exactly what f32 panels of the same (widened) values give.
    #[test]
    fn sixteen_bit_panels_widen_exactly() {
        let (m, k, cols) = (14, 37, 50);
        let x = values(m * k, 3);
        let w = values(cols * k, 5);
        for isa in isas() {
            fn check<T: PanelValue>(isa: Isa, x: &[f32], w: &[f32], (m, k, cols): (usize, usize, usize), of: fn(f32) -> T) {
                let mut narrow = vec![T::default(); cols.div_ceil(PANEL) * k * PANEL];
                pack(|j, kk| of(w[j * k + kk]), k, cols, &mut narrow);
                let mut wide = vec![f32::NAN; narrow.len()];
                pack(|j, kk| of(w[j * k + kk]).to_f32(), k, cols, &mut wide);
                let got = run(isa, x, m, &Rhs::packed(&narrow, k, cols));
                assert_eq!(got, run(isa, x, m, &Rhs::packed(&wide, k, cols)), "{isa:?} {}", std::any::type_name::<T>());
            }
            check(isa, &x, &w, (m, k, cols), half::bf16::from_f32);
            check(isa, &x, &w, (m, k, cols), half::f16::from_f32);
        }
    }

    /// The register transpose packs exactly what the scalar packing does, at every width and k tail.
    #[test]
    fn sixteen_bit_packing_matches_the_scalar_one() {
        for (k, cols) in [(16usize, 16usize), (37, 50), (64, 33), (5, 16), (48, 7)] {
            let rows: Vec<u16> = (0..cols * k).map(|i| (i * 40503 % 65521) as u16).collect();
            let size = cols.div_ceil(PANEL) * k * PANEL;
            let (mut fast, mut slow) = (vec![1u16; size], vec![2u16; size]);
            pack_bits16(&rows, k, cols, &mut fast);
            pack(|j, kk| rows[j * k + kk], k, cols, &mut slow);
            assert_eq!(fast, slow, "k {k}, {cols} columns");
        }
    }

    /// Every epilogue gives the bits of separate passes: the bias added, the activation applied (the backend's
    /// own pass), the result added to what the output held.
    fn check_epilogues(isa: Isa, x: &[f32], m: usize, b: &Rhs<f32>, plain: &[f32]) {
        let bias = values(b.cols, 9);
        let residual = values(m * b.cols, 11);
        for activation in [None, Some(Activation::Gelu), Some(Activation::QuickGelu), Some(Activation::Relu)] {
            for accumulate in [false, true] {
                let e = Epilogue { bias: Some(&bias), activation, accumulate };
                let mut got = if accumulate { residual.clone() } else { vec![f32::NAN; plain.len()] };
                // SAFETY: the CPU has `isa`; `got` is [m, cols].
                unsafe { product(isa, x, m, &b.with_epilogue(e), got.as_mut_ptr(), b.cols) };
                let mut want: Vec<f32> = plain.iter().enumerate().map(|(i, v)| v + bias[i % b.cols]).collect();
                if let Some(act) = activation {
                    activation::activate_in_place(&mut want, act);
                }
                if accumulate {
                    want.iter_mut().zip(&residual).for_each(|(w, r)| *w += r);
                }
                assert_eq!(got, want, "{isa:?} {m}x{}x{}: {activation:?}, accumulate {accumulate}", b.k, b.cols);
            }
        }
    }

    /// The instruction sets this CPU can run.
    fn isas() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|&i| isa() == Some(Isa::Avx512) || isa() == Some(i))
            .collect()
    }

    fn run<T: PanelValue>(isa: Isa, x: &[f32], m: usize, b: &Rhs<T>) -> Vec<f32> {
        let mut out = vec![f32::NAN; m * b.cols];
        // SAFETY: the CPU has `isa` (`isas`); `out` is [m, cols].
        unsafe { product(isa, x, m, b, out.as_mut_ptr(), b.cols) };
        out
    }
}
