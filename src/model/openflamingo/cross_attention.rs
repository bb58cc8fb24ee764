//! OpenFlamingo's `GatedCrossAttentionBlock` (open_flamingo 2.0.1 `helpers.py` L236-279), run before decoder
//! layer `i` when `(i + 1) % cross_attn_every_n_layers == 0`:
//!
//! ```text
//! h = h + tanh(attn_gate) * to_out(attn(q = to_q(LN(h)), the latents' K, V of the row's image))  no image: 0
//! h = h + tanh(ff_gate)   * ff(h)                 ff = LayerNorm, Linear, exact GELU, Linear     every row
//! ```
//! 8 heads of 64 whatever the model's width; `to_kv` rows k|v (split at load), no biases but the LayerNorms'.
//! A row sees only the latest image at or before it (`only_attend_immediate_media`); K and V of each image's
//! latents are computed once, into the media cache (`image_kv`), where OpenFlamingo recomputes them every step.

use crate::backend::Backend;
use crate::cache::media_cache::ImageKv;
use crate::error::Result;
use crate::io::config::Activation;
use crate::model::layers::{LayerNorm, Linear, WeightLoader};

pub const HEADS: usize = 8;
pub const DIM_HEAD: usize = 64;
const FF_MULT: usize = 4;
const EPS: f32 = 1e-5;

pub struct GatedCrossAttentionBlock<B: Backend> {
    norm: LayerNorm<B>,
    to_q: Linear<B>,
    to_k: Linear<B>,
    to_v: Linear<B>,
    to_out: Linear<B>,
    attn_gate: B::Weight,
    ff_norm: LayerNorm<B>,
    ff_in: Linear<B>,
    ff_out: Linear<B>,
    ff_gate: B::Weight,
}

impl<B: Backend> GatedCrossAttentionBlock<B> {
    /// The block `prefix` (`lang_encoder.<layers>.{i}.gated_cross_attn_layer`) of a `width`-wide decoder reading
    /// `vision_width`-wide latents.
    pub fn load(l: &WeightLoader<B>, prefix: &str, width: usize, vision_width: usize) -> Result<Self> {
        let (d, inner, ff) = (width, HEADS * DIM_HEAD, FF_MULT * width);
        let kv = format!("{prefix}.attn.to_kv.weight");
        Ok(GatedCrossAttentionBlock {
            norm: l.layer_norm(&format!("{prefix}.attn.norm"), d, EPS)?,
            to_q: l.linear(&format!("{prefix}.attn.to_q"), inner, d)?,
            to_k: l.linear_rows((&kv, None), (2 * inner, vision_width), 0..inner)?,
            to_v: l.linear_rows((&kv, None), (2 * inner, vision_width), inner..2 * inner)?,
            to_out: l.linear(&format!("{prefix}.attn.to_out"), d, inner)?,
            attn_gate: l.weight(&format!("{prefix}.attn_gate"), &[1])?,
            ff_norm: l.layer_norm(&format!("{prefix}.ff.0"), d, EPS)?,
            ff_in: l.linear(&format!("{prefix}.ff.1"), ff, d)?,
            ff_out: l.linear(&format!("{prefix}.ff.3"), d, ff)?,
            ff_gate: l.weight(&format!("{prefix}.ff_gate"), &[1])?,
        })
    }

    /// K and V of image latents `[images * 64, vision_width]`.
    pub fn image_kv(&self, b: &B, latents: &B::Tensor) -> ImageKv<B> {
        ImageKv {
            k: self.to_k.forward(b, latents),
            v: self.to_v.forward(b, latents),
        }
    }

    /// Updates a decoder step's residual stream `h` `[T, D]`; the layout gives each row's image slot in the media
    /// pools `k`, `v` (-1: none), `per_image` key rows each.
    pub fn forward(&self, b: &B, h: &mut B::Tensor, (k, v): (&B::Tensor, &B::Tensor), layout: &B::Layout, per_image: usize) {
        let q = self.to_q.forward(b, &self.norm.forward(b, h));
        let attn = b.cross_attention(&q, k, v, HEADS, layout, per_image);
        b.add_gated(h, &self.to_out.forward(b, &attn), &self.attn_gate);
        let m = self.ff_in.forward_activated(b, &self.ff_norm.forward(b, h), Activation::Gelu);
        b.add_gated(h, &self.ff_out.forward(b, &m), &self.ff_gate);
    }
}
