//! OpenFlamingo's `PerceiverResampler` (open_flamingo 2.0.1 `helpers.py` L68-132): 64 learned latents attend to an
//! image's vision tokens and to themselves (keys and values from `[media ; latents]`, `to_kv` rows k|v, split at
//! load so the concatenation is never built), then a feed-forward (LayerNorm, Linear, exact GELU, Linear, no
//! biases), both residual; a final LayerNorm. OpenFlamingo fixes its sizes in code (depth 6, 8 heads of 64, 4x
//! feed-forward) whatever the vision width, so the shapes come from the checkpoint's tensors.

use crate::backend::Backend;
use crate::error::Result;
use crate::io::config::Activation;
use crate::model::layers::{LayerNorm, Linear, WeightLoader};

pub const DEPTH: usize = 6;
pub const HEADS: usize = 8;
pub const DIM_HEAD: usize = 64;
pub const LATENTS: usize = 64;
pub const FF_MULT: usize = 4;
const EPS: f32 = 1e-5;

struct Layer<B: Backend> {
    norm_media: LayerNorm<B>,
    norm_latents: LayerNorm<B>,
    to_q: Linear<B>,
    to_k: Linear<B>,
    to_v: Linear<B>,
    to_out: Linear<B>,
    ff_norm: LayerNorm<B>,
    ff_in: Linear<B>,
    ff_out: Linear<B>,
}

pub struct PerceiverResampler<B: Backend> {
    latents: B::Weight,
    layers: Vec<Layer<B>>,
    norm: LayerNorm<B>,
}

impl<B: Backend> PerceiverResampler<B> {
    /// The resampler of `width`-wide vision tokens, under `prefix` (`perceiver`).
    pub fn load(l: &WeightLoader<B>, prefix: &str, width: usize) -> Result<Self> {
        let (d, inner, ff) = (width, HEADS * DIM_HEAD, FF_MULT * width);
        let layers = (0..DEPTH)
            .map(|i| {
                let (a, f) = (format!("{prefix}.layers.{i}.0"), format!("{prefix}.layers.{i}.1"));
                let kv = format!("{a}.to_kv.weight");
                Ok(Layer {
                    norm_media: l.layer_norm(&format!("{a}.norm_media"), d, EPS)?,
                    norm_latents: l.layer_norm(&format!("{a}.norm_latents"), d, EPS)?,
                    to_q: l.linear(&format!("{a}.to_q"), inner, d)?,
                    to_k: l.linear_rows((&kv, None), (2 * inner, d), 0..inner)?,
                    to_v: l.linear_rows((&kv, None), (2 * inner, d), inner..2 * inner)?,
                    to_out: l.linear(&format!("{a}.to_out"), d, inner)?,
                    ff_norm: l.layer_norm(&format!("{f}.0"), d, EPS)?,
                    ff_in: l.linear(&format!("{f}.1"), ff, d)?,
                    ff_out: l.linear(&format!("{f}.3"), d, ff)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PerceiverResampler {
            latents: l.weight(&format!("{prefix}.latents"), &[LATENTS, d])?,
            layers,
            norm: l.layer_norm(&format!("{prefix}.norm"), d, EPS)?,
        })
    }

    /// One image's vision tokens `[patches, D]` to its latents `[64, D]`.
    pub fn forward(&self, b: &B, media: &B::Tensor) -> B::Tensor {
        let mut latents = b.weight_to_tensor(&self.latents);
        for layer in &self.layers {
            let x = layer.norm_media.forward(b, media);
            let lat = layer.norm_latents.forward(b, &latents);
            let q = layer.to_q.forward(b, &lat);
            let (k_media, v_media) = (layer.to_k.forward(b, &x), layer.to_v.forward(b, &x));
            let (k_lat, v_lat) = (layer.to_k.forward(b, &lat), layer.to_v.forward(b, &lat));
            let a = b.resampler_attention(&q, &k_media, &v_media, &k_lat, &v_lat, HEADS);
            layer.to_out.forward_into(b, &a, &mut latents);
            let h = layer.ff_in.forward_activated(b, &layer.ff_norm.forward(b, &latents), Activation::Gelu);
            layer.ff_out.forward_into(b, &h, &mut latents);
        }
        self.norm.forward(b, &latents)
    }
}
