//! open_clip's `VisionTransformer` (open_clip 2.20.0 `transformer.py` L460-503) as OpenFlamingo uses it: a CLIP
//! ViT (QuickGELU for the OpenAI ViT-L/14) whose fused `in_proj` (rows q|k|v) is split at load. OpenFlamingo feeds
//! the resampler the last resblock's patch tokens, `x[:, 1:]`: the class token dropped, and neither `ln_post` nor
//! `proj` applied (flamingo.py L195 takes the second output; open_clip >= 2.23 would apply `ln_post` first).

use crate::backend::Backend;
use crate::error::Result;
use crate::io::config::Activation;
use crate::io::openflamingo_config::OpenClipConfig;
use crate::model::layers::{ClipEncoderLayer, ClipVisionTransformer, WeightLoader};

/// open_clip uses torch's LayerNorm default.
const EPS: f32 = 1e-5;

pub struct VisionTransformer<B: Backend>(ClipVisionTransformer<B>);

impl<B: Backend> VisionTransformer<B> {
    pub fn load(l: &WeightLoader<B>, prefix: &str, cfg: &OpenClipConfig) -> Result<Self> {
        let v = &cfg.vision;
        let (d, m, p) = (v.width, v.mlp_width(), v.patch_size);
        let layers = (0..v.layers)
            .map(|i| {
                let lp = format!("{prefix}.transformer.resblocks.{i}");
                let (w, bias) = (format!("{lp}.attn.in_proj_weight"), format!("{lp}.attn.in_proj_bias"));
                let in_proj = |part: usize| l.linear_rows((&w, Some(&bias)), (3 * d, d), part * d..(part + 1) * d);
                Ok(ClipEncoderLayer {
                    layer_norm1: l.layer_norm(&format!("{lp}.ln_1"), d, EPS)?,
                    q_proj: in_proj(0)?,
                    k_proj: in_proj(1)?,
                    v_proj: in_proj(2)?,
                    out_proj: l.linear_bias(&format!("{lp}.attn.out_proj"), d, d)?,
                    layer_norm2: l.layer_norm(&format!("{lp}.ln_2"), d, EPS)?,
                    fc1: l.linear_bias(&format!("{lp}.mlp.c_fc"), m, d)?,
                    fc2: l.linear_bias(&format!("{lp}.mlp.c_proj"), d, m)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTransformer(ClipVisionTransformer {
            image_size: v.image_size,
            patch_size: p,
            heads: v.heads(),
            activation: if cfg.quick_gelu { Activation::QuickGelu } else { Activation::Gelu },
            patch_embedding: l.weight(&format!("{prefix}.conv1.weight"), &[d, 3, p, p])?,
            class_embedding: l.weight(&format!("{prefix}.class_embedding"), &[d])?,
            position_embedding: l.weight(&format!("{prefix}.positional_embedding"), &[1 + v.patch_tokens(), d])?,
            pre_layernorm: l.layer_norm(&format!("{prefix}.ln_pre"), d, EPS)?,
            layers,
        }))
    }

    /// One image's pixels `[3, S, S]` to the tokens the resampler reads: `[patches, width]`.
    pub fn forward(&self, b: &B, pixels: &[f32]) -> B::Tensor {
        let h = self.0.forward(b, pixels);
        b.slice_rows(&h, 1, b.dims(&h).0 - 1)
    }
}
