//! The building blocks every model family shares: the weight loader that checks shapes against the config, and
//! the linear, normalisation and MLP layers, each a thin typed wrapper over one backend op.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::config::Activation;
use crate::io::safetensors::{TensorRef, WeightStore};

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
        self.check_finite(&t)?;
        let w = self.backend.load_weight(&t)?;
        self.progress.inc(1);
        Ok(w)
    }

    fn check_finite(&self, t: &TensorRef) -> Result<()> {
        if !self.check_finite {
            return Ok(());
        }
        match t.first_non_finite() {
            Some(i) => Err(Error::Safetensors {
                path: t.path.to_path_buf(),
                message: format!(
                    "tensor {} holds a NaN or infinite value (element {i}); the checkpoint is corrupt \
                     (--skip-weight-check loads it anyway)",
                    t.name
                ),
            }),
            None => Ok(()),
        }
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

    /// Rows `range` of the stored `[rows, cols]` `weight` (and `bias`) as one linear: a part of a fused projection
    /// (open_clip's `in_proj`, q|k|v; OpenFlamingo's `to_kv`, k|v).
    pub fn linear_rows(
        &self,
        names: (&str, Option<&str>),
        shape: (usize, usize),
        range: std::ops::Range<usize>,
    ) -> Result<Linear<B>> {
        self.linear_row_ranges(names, shape, &[range])
    }

    /// [`WeightLoader::linear_rows`] of several row ranges, in order (GPT-NeoX's per-head q|k|v).
    pub fn linear_row_ranges(
        &self,
        (weight, bias): (&str, Option<&str>),
        (rows, cols): (usize, usize),
        ranges: &[std::ops::Range<usize>],
    ) -> Result<Linear<B>> {
        let part = |name: &str, shape: &[usize]| -> Result<B::Weight> {
            let t = self.store.get(name, shape)?.rows_of(ranges);
            self.check_finite(&t)?;
            self.backend.load_weight(&t)
        };
        let linear = Linear {
            weight: part(weight, &[rows, cols])?,
            bias: bias.map(|name| part(name, &[rows])).transpose()?,
        };
        self.progress.inc(1);
        Ok(linear)
    }

    pub fn layer_norm(&self, prefix: &str, width: usize, eps: f32) -> Result<LayerNorm<B>> {
        Ok(LayerNorm {
            weight: self.weight(&format!("{prefix}.weight"), &[width])?,
            bias: self.weight(&format!("{prefix}.bias"), &[width])?,
            eps,
        })
    }

    /// A LayerNorm with a weight and no bias (MPT): the bias a zero vector, which adds exactly nothing.
    pub fn layer_norm_without_bias(&self, prefix: &str, width: usize, eps: f32) -> Result<LayerNorm<B>> {
        Ok(LayerNorm {
            weight: self.weight(&format!("{prefix}.weight"), &[width])?,
            bias: self.backend.load_weight(&TensorRef::zeros(&format!("{prefix}.bias"), &[width]))?,
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

/// A CLIP ViT (IDEFICS' and OpenFlamingo's vision towers): the patch convolution (no bias) as one product, the
/// class token first, learned positions, a pre-LayerNorm, then pre-LN encoder layers. Each family's loader names
/// its weights and says which of the output tokens it feeds on.
pub struct ClipVisionTransformer<B: Backend> {
    pub image_size: usize,
    pub patch_size: usize,
    pub heads: usize,
    pub activation: Activation,
    /// `[D, 3, patch, patch]`.
    pub patch_embedding: B::Weight,
    pub class_embedding: B::Weight,
    /// `[1 + patches, D]`.
    pub position_embedding: B::Weight,
    pub pre_layernorm: LayerNorm<B>,
    pub layers: Vec<ClipEncoderLayer<B>>,
}

impl<B: Backend> ClipVisionTransformer<B> {
    /// One image's pixels `[3, S, S]` (S = image_size) to the last layer's tokens `[1 + patches, D]`, class token
    /// first.
    pub fn forward(&self, b: &B, pixels: &[f32]) -> B::Tensor {
        let (size, patch) = (self.image_size, self.patch_size);
        let grid = size / patch;
        let patches = b.from_host(im2col(pixels, size, patch), grid * grid, 3 * patch * patch);
        let embedded = b.linear(&patches, &self.patch_embedding, None);
        let class = b.weight_to_tensor(&self.class_embedding);
        let mut h = b.concat_rows(&class, &embedded);
        b.add_assign(&mut h, &b.weight_to_tensor(&self.position_embedding));
        let mut h = self.pre_layernorm.forward(b, &h);
        for layer in &self.layers {
            h = layer.forward(b, h, self.heads, self.activation);
        }
        h
    }
}

/// A CLIP ViT encoder layer (pre-LN; IDEFICS' and OpenFlamingo's vision towers): `h += out(attn(ln1 h))`,
/// `h += fc2(act(fc1(ln2 h)))`, every projection with a bias. Each family's loader names its weights.
pub struct ClipEncoderLayer<B: Backend> {
    pub layer_norm1: LayerNorm<B>,
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub layer_norm2: LayerNorm<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> ClipEncoderLayer<B> {
    /// Runs the layer on one image's tokens `h` `[T, D]` (full attention, `heads` heads).
    pub fn forward(&self, b: &B, mut h: B::Tensor, heads: usize, act: Activation) -> B::Tensor {
        let x = self.layer_norm1.forward(b, &h);
        let (q, k, v) = (self.q_proj.forward(b, &x), self.k_proj.forward(b, &x), self.v_proj.forward(b, &x));
        let a = b.attention(&q, &k, &v, heads);
        self.out_proj.forward_into(b, &a, &mut h);
        let x = self.layer_norm2.forward(b, &h);
        let m = self.fc1.forward_activated(b, &x, act);
        self.fc2.forward_into(b, &m, &mut h);
        h
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
