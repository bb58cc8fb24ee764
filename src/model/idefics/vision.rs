//! `IdeficsVisionTransformer` (transformers `models/idefics/vision.py`, a CLIP ViT): patch embedding, class token,
//! learned positions, `pre_layrnorm`, pre-LN encoder layers. The output is the last layer's hidden state for all
//! `1 + patches` tokens, with no post-LayerNorm (IDEFICS feeds `last_hidden_state` onward; `post_layernorm` only
//! touches the pooled token, which IDEFICS never uses).

use crate::backend::Backend;
use crate::error::Result;
use crate::io::config::VisionConfig;
use crate::model::layers::{ClipEncoderLayer, ClipVisionTransformer, WeightLoader};

pub struct IdeficsVisionTransformer<B: Backend>(ClipVisionTransformer<B>);

impl<B: Backend> IdeficsVisionTransformer<B> {
    pub fn load(l: &WeightLoader<B>, prefix: &str, cfg: &VisionConfig) -> Result<Self> {
        let (d, m, p) = (cfg.embed_dim, cfg.intermediate_size, cfg.patch_size);
        let eps = cfg.layer_norm_eps as f32;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let lp = format!("{prefix}.encoder.layers.{i}");
                Ok(ClipEncoderLayer {
                    layer_norm1: l.layer_norm(&format!("{lp}.layer_norm1"), d, eps)?,
                    q_proj: l.linear_bias(&format!("{lp}.self_attn.q_proj"), d, d)?,
                    k_proj: l.linear_bias(&format!("{lp}.self_attn.k_proj"), d, d)?,
                    v_proj: l.linear_bias(&format!("{lp}.self_attn.v_proj"), d, d)?,
                    out_proj: l.linear_bias(&format!("{lp}.self_attn.out_proj"), d, d)?,
                    layer_norm2: l.layer_norm(&format!("{lp}.layer_norm2"), d, eps)?,
                    fc1: l.linear_bias(&format!("{lp}.mlp.fc1"), m, d)?,
                    fc2: l.linear_bias(&format!("{lp}.mlp.fc2"), d, m)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(IdeficsVisionTransformer(ClipVisionTransformer {
            image_size: cfg.image_size,
            patch_size: p,
            heads: cfg.num_attention_heads,
            activation: cfg.activation(),
            patch_embedding: l.weight(&format!("{prefix}.embeddings.patch_embedding.weight"), &[d, 3, p, p])?,
            class_embedding: l.weight(&format!("{prefix}.embeddings.class_embedding"), &[d])?,
            position_embedding: l.weight(
                &format!("{prefix}.embeddings.position_embedding.weight"),
                &[cfg.num_positions(), d],
            )?,
            pre_layernorm: l.layer_norm(&format!("{prefix}.pre_layrnorm"), d, eps)?,
            layers,
        }))
    }

    /// One image's pixels `[3, S, S]` (S = image_size) to its tokens `[1 + patches, embed_dim]`.
    pub fn forward(&self, b: &B, pixels: &[f32]) -> B::Tensor {
        self.0.forward(b, pixels)
    }
}
