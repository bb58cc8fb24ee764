//! `IdeficsVisionTransformer` (transformers `models/idefics/vision.py`, a CLIP ViT): patch embedding, class token,
//! learned positions, `pre_layrnorm`, pre-LN encoder layers. The output is the last layer's hidden state for all
//! `1 + patches` tokens, with no post-LayerNorm (IDEFICS feeds `last_hidden_state` onward; `post_layernorm` only
//! touches the pooled token, which IDEFICS never uses).

use crate::backend::Backend;
use crate::error::Result;
use crate::io::config::VisionConfig;
use crate::model::layers::{im2col, LayerNorm, Linear, WeightLoader};

struct EncoderLayer<B: Backend> {
    layer_norm1: LayerNorm<B>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    out_proj: Linear<B>,
    layer_norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

pub struct IdeficsVisionTransformer<B: Backend> {
    cfg: VisionConfig,
    patch_embedding: B::Weight,
    class_embedding: B::Weight,
    position_embedding: B::Weight,
    pre_layrnorm: LayerNorm<B>,
    layers: Vec<EncoderLayer<B>>,
}

impl<B: Backend> IdeficsVisionTransformer<B> {
    pub fn load(l: &WeightLoader<B>, prefix: &str, cfg: &VisionConfig) -> Result<Self> {
        let (d, m, p) = (cfg.embed_dim, cfg.intermediate_size, cfg.patch_size);
        let eps = cfg.layer_norm_eps as f32;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let lp = format!("{prefix}.encoder.layers.{i}");
                Ok(EncoderLayer {
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
        Ok(IdeficsVisionTransformer {
            cfg: cfg.clone(),
            patch_embedding: l.weight(
                &format!("{prefix}.embeddings.patch_embedding.weight"),
                &[d, 3, p, p],
            )?,
            class_embedding: l.weight(&format!("{prefix}.embeddings.class_embedding"), &[d])?,
            position_embedding: l.weight(
                &format!("{prefix}.embeddings.position_embedding.weight"),
                &[cfg.num_positions(), d],
            )?,
            pre_layrnorm: l.layer_norm(&format!("{prefix}.pre_layrnorm"), d, eps)?,
            layers,
        })
    }

    /// One image's pixels `[3, S, S]` (S = image_size) to its tokens `[1 + patches, embed_dim]`.
    pub fn forward(&self, b: &B, pixels: &[f32]) -> B::Tensor {
        let cfg = &self.cfg;
        let patches = im2col(pixels, cfg.image_size, cfg.patch_size);
        let (n_patches, patch_len) = (cfg.grid() * cfg.grid(), 3 * cfg.patch_size * cfg.patch_size);
        let patches = b.from_host(patches, n_patches, patch_len);
        let embedded = b.linear(&patches, &self.patch_embedding, None);
        let class = b.weight_to_tensor(&self.class_embedding);
        let mut h = b.concat_rows(&class, &embedded);
        b.add_assign(&mut h, &b.weight_to_tensor(&self.position_embedding));
        let mut h = self.pre_layrnorm.forward(b, &h);
        for layer in &self.layers {
            h = self.encoder_layer(b, layer, h);
        }
        h
    }

    fn encoder_layer(&self, b: &B, layer: &EncoderLayer<B>, mut h: B::Tensor) -> B::Tensor {
        let x = layer.layer_norm1.forward(b, &h);
        let (q, k, v) = (
            layer.q_proj.forward(b, &x),
            layer.k_proj.forward(b, &x),
            layer.v_proj.forward(b, &x),
        );
        let a = b.attention(&q, &k, &v, self.cfg.num_attention_heads);
        layer.out_proj.forward_into(b, &a, &mut h);
        let x = layer.layer_norm2.forward(b, &h);
        let m = layer.fc1.forward_activated(b, &x, self.cfg.activation());
        layer.fc2.forward_into(b, &m, &mut h);
        h
    }
}
