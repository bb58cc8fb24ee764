//! `IdeficsPerceiverResampler` (transformers `models/idefics/perceiver.py`): learned latents cross-attend to the
//! vision tokens. Keys and values are computed from `[context ; latents]`; the backend's `resampler_attention` takes
//! both halves separately so the concatenation is never built. FFN is ReLU, no biases; every LayerNorm uses eps 1e-5.

use crate::backend::Backend;
use crate::error::Result;
use crate::io::config::{PerceiverConfig, VisionConfig};
use crate::model::layers::{optional, LayerNorm, Linear, WeightLoader};

const EPS: f32 = 1e-5;

struct Block<B: Backend> {
    context_layer_norm: LayerNorm<B>,
    latents_layer_norm: LayerNorm<B>,
    q_layer_norm: Option<LayerNorm<B>>,
    k_layer_norm: Option<LayerNorm<B>>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    output_proj: Linear<B>,
    mlp_ln: LayerNorm<B>,
    mlp_fc: Linear<B>,
    mlp_c_proj: Linear<B>,
}

pub struct IdeficsPerceiverResampler<B: Backend> {
    heads: usize,
    latents: B::Weight,
    blocks: Vec<Block<B>>,
    layer_norm: LayerNorm<B>,
}

impl<B: Backend> IdeficsPerceiverResampler<B> {
    pub fn load(
        l: &WeightLoader<B>,
        prefix: &str,
        p: &PerceiverConfig,
        v: &VisionConfig,
    ) -> Result<Self> {
        let d = v.embed_dim;
        let (hd, inner) = (
            p.resampler_head_dim,
            p.resampler_n_heads * p.resampler_head_dim,
        );
        let blocks = (0..p.resampler_depth)
            .map(|i| {
                let a = format!("{prefix}.blocks.{i}.0");
                let m = format!("{prefix}.blocks.{i}.1");
                let qk_norm = |name: &str| {
                    optional(p.qk_layer_norms_perceiver, || {
                        l.layer_norm(&format!("{a}.{name}"), hd, EPS)
                    })
                };
                Ok(Block {
                    context_layer_norm: l.layer_norm(&format!("{a}.context_layer_norm"), d, EPS)?,
                    latents_layer_norm: l.layer_norm(&format!("{a}.latents_layer_norm"), d, EPS)?,
                    q_layer_norm: qk_norm("q_layer_norm")?,
                    k_layer_norm: qk_norm("k_layer_norm")?,
                    q_proj: l.linear(&format!("{a}.q_proj"), inner, d)?,
                    k_proj: l.linear(&format!("{a}.k_proj"), inner, d)?,
                    v_proj: l.linear(&format!("{a}.v_proj"), inner, d)?,
                    output_proj: l.linear(&format!("{a}.output_proj"), d, inner)?,
                    mlp_ln: l.layer_norm(&format!("{m}.ln"), d, EPS)?,
                    mlp_fc: l.linear(&format!("{m}.fc"), 4 * d, d)?,
                    mlp_c_proj: l.linear(&format!("{m}.c_proj"), d, 4 * d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(IdeficsPerceiverResampler {
            heads: p.resampler_n_heads,
            latents: l.weight(&format!("{prefix}.latents"), &[p.resampler_n_latents, d])?,
            blocks,
            layer_norm: l.layer_norm(&format!("{prefix}.layer_norm"), d, EPS)?,
        })
    }

    /// One image's vision tokens `[n_ctx, D]` to its latents `[n_latents, D]`.
    pub fn forward(&self, b: &B, context: &B::Tensor) -> B::Tensor {
        let mut latents = b.weight_to_tensor(&self.latents);
        for blk in &self.blocks {
            let ctx = blk.context_layer_norm.forward(b, context);
            let lat = blk.latents_layer_norm.forward(b, &latents);
            let mut q = blk.q_proj.forward(b, &lat);
            let (mut k_ctx, v_ctx) = (blk.k_proj.forward(b, &ctx), blk.v_proj.forward(b, &ctx));
            let (mut k_lat, v_lat) = (blk.k_proj.forward(b, &lat), blk.v_proj.forward(b, &lat));
            if let (Some(qn), Some(kn)) = (&blk.q_layer_norm, &blk.k_layer_norm) {
                q = qn.forward(b, &q);
                k_ctx = kn.forward(b, &k_ctx);
                k_lat = kn.forward(b, &k_lat);
            }
            let a = b.resampler_attention(&q, &k_ctx, &v_ctx, &k_lat, &v_lat, self.heads);
            blk.output_proj.forward_into(b, &a, &mut latents);
            let x = blk.mlp_ln.forward(b, &latents);
            let m = blk.mlp_fc.forward_activated(b, &x, crate::io::config::Activation::Relu);
            blk.mlp_c_proj.forward_into(b, &m, &mut latents);
        }
        self.layer_norm.forward(b, &latents)
    }
}
