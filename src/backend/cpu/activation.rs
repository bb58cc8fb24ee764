//! The exact (erf) GELU, `x * Phi(x)`, vectorised: `Phi` from two polynomials, branch-free so that the compiler
//! runs it 8 or 16 lanes at a time (`libm::erff` per element took ~13% of a cpu-mid prefill).
//!
//! With `u = x / sqrt(2)`: for `|u| <= 0.9`, `Phi = 1/2 + u P(u^2) / 2` (P: `erf(u) / u`, degree 5); beyond it
//! `Phi` is `1 - erfc(|u|) / 2` or `erfc(|u|) / 2`, with `erfc(t) = exp(-t^2) Q(1/t - 0.6) / t` (Q: `t erfcx(t)`,
//! degree 10, fitted on [0.9, 10]). The negative tail is computed as `erfc` itself, never as `1 + erf`, so it
//! keeps its relative precision. Measured against f64 (`tests`): relative error <= 4e-7 for x in [0, 1.27],
//! <= 5e-6 elsewhere down to x = -8 (`1/2 + erf/2` loses a little just above x = -1.27; further out, the
//! rounding of `t^2` inside the exponential), absolute < 1e-18 below. The coefficients are least-squares fits
//! made with numpy in float64, rounded to f32.
//!
//! Every element is computed by the same operations wherever it sits: the result does not depend on the batch.
//! The other activations (tanh GELU, QuickGELU, ReLU) share the pass (`activate_in_place`) and the per-element
//! code a matrix product's epilogue runs (`activate_all`).

use rayon::prelude::*;

use crate::io::config::Activation;

/// `erf(u) / u` on `u^2` in [0, 0.81], lowest order first.
const ERF_OVER_U: [f32; 6] = [
    1.128_379_1,
    -0.376_125_48,
    0.112_823_285,
    -0.026_784_515,
    0.005_019_129_7,
    -0.000_612_328_76,
];

/// `t erfcx(t)` on `1/t - 0.6` for `t` in [0.9, 10], lowest order first.
const T_ERFCX: [f32; 11] = [
    0.493_812_47,
    -0.171_380_03,
    -0.007_007_83,
    0.080_165_83,
    -0.084_115_23,
    0.051_809_81,
    -0.007_923_148,
    -0.042_694_38,
    0.075_983_11,
    -0.034_347_016,
    -0.017_657_546,
];

/// Elements per task: large enough that threads do not contend, small enough to share a row's work.
const CHUNK: usize = 1 << 14;

/// `x = act(x)` for every element, in parallel.
pub fn activate_in_place(x: &mut [f32], act: Activation) {
    x.par_chunks_mut(CHUNK).for_each(|chunk| activate_chunk(chunk, act));
}

fn activate_chunk(x: &mut [f32], act: Activation) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { activate_chunk_avx512(x, act) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { activate_chunk_avx2(x, act) };
        }
    }
    activate_all(x, act);
}

/// [`activate_chunk`] compiled for AVX-512 (the same operations, 16 lanes at a time: the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn activate_chunk_avx512(x: &mut [f32], act: Activation) {
    activate_all(x, act);
}

/// [`activate_chunk`] compiled for AVX2 (8 lanes at a time: the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn activate_chunk_avx2(x: &mut [f32], act: Activation) {
    activate_all(x, act);
}

/// `x = act(x)`, element by element, in the vector width of the caller's target features: every path that
/// applies an activation (this module's pass, a matrix product's epilogue) runs this, so they give the same bits.
#[inline(always)]
pub fn activate_all(x: &mut [f32], act: Activation) {
    // A `for` loop, not `Iterator::for_each`: that is a function of its own, which the compiler may leave
    // un-inlined and so compiled without the caller's vector features.
    #[inline(always)]
    fn each(x: &mut [f32], f: impl Fn(f32) -> f32) {
        for v in x {
            *v = f(*v);
        }
    }
    match act {
        Activation::Gelu => each(x, gelu),
        Activation::GeluTanh => each(x, gelu_tanh),
        Activation::QuickGelu => each(x, |v| v / (1.0 + (-1.702 * v).exp())),
        Activation::Relu => each(x, |v| v.max(0.0)),
    }
}

/// The tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

/// The exact GELU of one value.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    x * normal_cdf(x)
}

#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    let u = x * std::f32::consts::FRAC_1_SQRT_2;
    let near = 0.5 + 0.5 * (u * horner(u * u, &ERF_OVER_U));
    let t = u.abs().clamp(0.9, 10.0);
    let half_erfc = 0.5 * (exp_negative(-(t * t)) * horner(1.0 / t - 0.6, &T_ERFCX) / t);
    let far = if u > 0.0 { 1.0 - half_erfc } else { half_erfc };
    if u.abs() <= 0.9 {
        near
    } else {
        far
    }
}

#[inline(always)]
fn horner<const N: usize>(z: f32, c: &[f32; N]) -> f32 {
    c.iter().rev().fold(0.0, |acc, &ci| acc * z + ci)
}

/// `e^y` for `y <= 0` (below -87, where f32 leaves the normal range, the result is e^-87 ~ 1.6e-38; NaN stays NaN):
/// `2^n e^r` with `|r| <= ln2 / 2` and e^r by its Taylor series to r^7 (error < 3e-9).
#[inline(always)]
pub fn exp_negative(y: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let y = if y < -87.0 { -87.0 } else { y }; // not `max`, which would turn NaN into e^-87
    let n = (y * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (y - n * LN2_HI) - n * LN2_LO;
    const TAYLOR: [f32; 8] = [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    horner(r, &TAYLOR) * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: f64) -> f64 {
        // Phi(x) = erfc(-x / sqrt 2) / 2, in f64 (no cancellation for negative x).
        x * 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    /// Over [-14, 14] in small steps (and the kinks): within 5e-6 relative of the f64 GELU down to x = -8 (4e-7
    /// on [0, 1.27]), within 1e-18 below (where |gelu| < 1e-14); the vectorised path and the scalar one
    /// agree bit for bit.
    #[test]
    fn gelu_matches_f64_and_the_vector_path_equals_the_scalar_one() {
        let mut xs: Vec<f32> = (-1_400_000..=1_400_000).map(|i| i as f32 * 1e-5).collect();
        xs.extend([0.9 * std::f32::consts::SQRT_2, -0.9 * std::f32::consts::SQRT_2, 1e-30, -1e-30, 0.0, 40.0, -40.0]);
        let mut worst = 0f64;
        for &x in &xs {
            let (got, want) = (gelu(x) as f64, reference(x as f64));
            let err = (got - want).abs() / want.abs().max(1e-35);
            let bound = if (0.0..=1.27).contains(&x) { 4e-7 } else { 5e-6 };
            let ok = err <= bound || (x < -8.0 && (got - want).abs() < 1e-18);
            assert!(ok, "gelu({x}) = {got}, want {want}");
            worst = worst.max(err);
        }
        assert!(worst > 0.0, "a real comparison");
        let mut fast = xs.clone();
        activate_in_place(&mut fast, Activation::Gelu);
        let slow: Vec<f32> = xs.iter().map(|&x| gelu(x)).collect();
        assert!(fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits()), "vector vs scalar bits");
        assert!(gelu(f32::NAN).is_nan());
        assert!(exp_negative(f32::NAN).is_nan());
        for y in [0.0, -1e-3, -0.5, -1.0, -10.0, -80.0] {
            let (got, want) = (exp_negative(y) as f64, (y as f64).exp());
            assert!((got - want).abs() <= 2e-7 * want, "exp({y}) = {got}, want {want}");
        }
    }
}
