//! The building blocks every model family shares: the weight loader that checks shapes against the config, and
//! the linear, normalisation and MLP layers, each a thin typed wrapper over one backend op.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::config::Activation;
use crate::io::safetensors::WeightStore;

/// `Ok(Some(load()))` when `present`, else `Ok(None)`: for parts a config option switches on.
pub fn optional<T>(present: bool, load: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
    present.then(load).transpose()
}

/// Whether loads skip the scan for NaN and infinity (`--skip-weight-check`, for the whole process).
static SKIP_WEIGHT_CHECK: AtomicBool = AtomicBool::new(false);

/// Loads from now on trust the checkpoint's values (`--skip-weight-check`).
pub fn skip_weight_check() {
    SKIP_WEIGHT_CHECK.store(true, Ordering::Relaxed);
}

/// Reads named tensors, checks their shapes against the config, and hands them to the backend.
pub struct WeightLoader<'a, B: Backend> {
    pub store: &'a WeightStore,
    pub backend: &'a B,
    progress: ProgressBar,
    /// Whether weights are scanned for NaN and infinity as they load.
    check_finite: bool,
}

impl<'a, B: Backend> WeightLoader<'a, B> {
    pub fn new(store: &'a WeightStore, backend: &'a B, show_progress: bool) -> Self {
        let progress = if show_progress {
            let bar = ProgressBar::new(store.summary().len() as u64);
            bar.set_style(
                ProgressStyle::with_template("loading weights {bar:40} {pos}/{len} tensors {msg}")
                    .expect("static template"),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        let skip = SKIP_WEIGHT_CHECK.load(Ordering::Relaxed)
            || std::env::var_os("FLAMINGO_SKIP_WEIGHT_CHECK").is_some_and(|v| v == "1");
        WeightLoader {
            check_finite: !store.is_generated() && !skip,
            store,
            backend,
            progress,
        }
    }

    /// Loads a weight, refusing one with a NaN or infinite value (unless `--skip-weight-check` or
    /// `FLAMINGO_SKIP_WEIGHT_CHECK=1`; generated
    /// weights are finite by construction).
    pub fn weight(&self, name: &str, shape: &[usize]) -> Result<B::Weight> {
        let t = self.store.get(name, shape)?;
        if self.check_finite {
            if let Some(i) = t.first_non_finite() {
                return Err(Error::Safetensors {
                    path: t.path.to_path_buf(),
                    message: format!(
                        "tensor {name} holds a NaN or infinite value (element {i}); the checkpoint is corrupt \
                         (--skip-weight-check loads it anyway)"
                    ),
                });
            }
        }
        let w = self.backend.load_weight(&t)?;
        self.progress.inc(1);
        Ok(w)
    }

    pub fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear<B>> {
        Ok(Linear {
            weight: self.weight(&format!("{prefix}.weight"), &[out, inp])?,
            bias: None,
        })
    }

    pub fn linear_bias(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear<B>> {
        Ok(Linear {
            weight: self.weight(&format!("{prefix}.weight"), &[out, inp])?,
            bias: Some(self.weight(&format!("{prefix}.bias"), &[out])?),
        })
    }

    pub fn layer_norm(&self, prefix: &str, width: usize, eps: f32) -> Result<LayerNorm<B>> {
        Ok(LayerNorm {
            weight: self.weight(&format!("{prefix}.weight"), &[width])?,
            bias: self.weight(&format!("{prefix}.bias"), &[width])?,
            eps,
        })
    }

    pub fn rms_norm(&self, prefix: &str, width: usize, eps: f32) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            weight: self.weight(&format!("{prefix}.weight"), &[width])?,
            eps,
        })
    }

    /// Clears the progress bar once every weight is loaded.
    pub fn finish(&self) {
        self.progress.finish_and_clear();
    }
}

pub struct Linear<B: Backend> {
    weight: B::Weight,
    bias: Option<B::Weight>,
}

impl<B: Backend> Linear<B> {
    pub fn forward(&self, b: &B, x: &B::Tensor) -> B::Tensor {
        b.linear(x, &self.weight, self.bias.as_ref())
    }

    /// `act(forward(x))`, fused where the backend can.
    pub fn forward_activated(&self, b: &B, x: &B::Tensor, act: Activation) -> B::Tensor {
        b.linear_activate(x, &self.weight, self.bias.as_ref(), act)
    }

    /// `residual += forward(x)`, fused where the backend can.
    pub fn forward_into(&self, b: &B, x: &B::Tensor, residual: &mut B::Tensor) {
        b.linear_add(residual, x, &self.weight, self.bias.as_ref())
    }
}

pub struct LayerNorm<B: Backend> {
    weight: B::Weight,
    bias: B::Weight,
    eps: f32,
}

impl<B: Backend> LayerNorm<B> {
    pub fn forward(&self, b: &B, x: &B::Tensor) -> B::Tensor {
        b.layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

pub struct RmsNorm<B: Backend> {
    weight: B::Weight,
    eps: f32,
}

impl<B: Backend> RmsNorm<B> {
    pub fn forward(&self, b: &B, x: &B::Tensor) -> B::Tensor {
        b.rms_norm(x, &self.weight, self.eps)
    }
}

/// LLaMA's SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
pub struct Mlp<B: Backend> {
    gate_proj: Linear<B>,
    up_proj: Linear<B>,
    down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn load(l: &WeightLoader<B>, prefix: &str, d: usize, inter: usize) -> Result<Self> {
        Ok(Mlp {
            gate_proj: l.linear(&format!("{prefix}.gate_proj"), inter, d)?,
            up_proj: l.linear(&format!("{prefix}.up_proj"), inter, d)?,
            down_proj: l.linear(&format!("{prefix}.down_proj"), d, inter)?,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> B::Tensor {
        self.down_proj.forward(b, &self.gated(b, x))
    }

    /// `residual += forward(x)`, the down projection adding as it stores where the backend can.
    pub fn forward_into(&self, b: &B, x: &B::Tensor, residual: &mut B::Tensor) {
        self.down_proj.forward_into(b, &self.gated(b, x), residual)
    }

    fn gated(&self, b: &B, x: &B::Tensor) -> B::Tensor {
        b.swiglu(&self.gate_proj.forward(b, x), &self.up_proj.forward(b, x))
    }
}

/// Non-overlapping `patch`² windows of a `[3, size, size]` image as rows `[c, ky, kx]`, patches row-major: the
/// stride-`patch` convolution becomes one matrix product with the conv weight viewed as `[D, 3*patch*patch]`.
/// Like the convolution, pixels past `grid * patch` (when `size` is not a multiple of `patch`) are ignored.
pub fn im2col(pixels: &[f32], size: usize, patch: usize) -> Vec<f32> {
    let grid = size / patch;
    let mut out = Vec::with_capacity(grid * grid * 3 * patch * patch);
    for py in 0..grid {
        for px in 0..grid {
            for c in 0..3 {
                for ky in 0..patch {
                    let row = c * size * size + (py * patch + ky) * size + px * patch;
                    out.extend_from_slice(&pixels[row..row + patch]);
                }
            }
        }
    }
    out
}
