//! `IdeficsGatedCrossAttentionLayer` (transformers `modeling_idefics.py`): run before decoder layer `idx` when
//! `idx % cross_layer_interval == 0`.
//!
//! ```text
//! h = h + tanh(alpha_cross_attn) * o_proj(attn(q = RMS_q(q_proj(RMS_in(h))), images' K, V))   rows seeing no image: 0
//! h = h + tanh(alpha_dense)      * SwiGLU(RMS_post(h))                                        every row
//! ```
//! K and V of the image tokens never change during a request: `image_kv` computes them once, at admission, into
//! the media cache (transformers recomputes them at every decode step).

use crate::backend::Backend;
use crate::cache::media_cache::ImageKv;
use crate::error::Result;
use crate::io::config::{AlphaType, IdeficsConfig};
use crate::model::layers::{optional, Linear, Mlp, RmsNorm, WeightLoader};

pub struct IdeficsGatedCrossAttentionLayer<B: Backend> {
    heads: usize,
    input_layernorm: RmsNorm<B>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    q_layer_norm: Option<RmsNorm<B>>,
    k_layer_norm: Option<RmsNorm<B>>,
    post_attention_layernorm: RmsNorm<B>,
    mlp: Mlp<B>,
    alpha_cross_attn: B::Weight,
    alpha_dense: B::Weight,
}

impl<B: Backend> IdeficsGatedCrossAttentionLayer<B> {
    pub fn load(l: &WeightLoader<B>, prefix: &str, cfg: &IdeficsConfig) -> Result<Self> {
        let (d, dv, hd) = (cfg.hidden_size, cfg.vision_config.embed_dim, cfg.head_dim());
        let eps = cfg.rms_norm_eps as f32;
        let gate_shape: &[usize] = match cfg.alpha() {
            AlphaType::Float => &[1],
            AlphaType::Vector => &[1, 1, d],
        };
        let qk_norm = |name: &str| {
            let path = format!("{prefix}.cross_attn.{name}");
            optional(cfg.qk_layer_norms, || l.rms_norm(&path, hd, eps))
        };
        Ok(IdeficsGatedCrossAttentionLayer {
            heads: cfg.num_attention_heads,
            input_layernorm: l.rms_norm(&format!("{prefix}.input_layernorm"), d, eps)?,
            q_proj: l.linear(&format!("{prefix}.cross_attn.q_proj"), d, d)?,
            k_proj: l.linear(&format!("{prefix}.cross_attn.k_proj"), d, dv)?,
            v_proj: l.linear(&format!("{prefix}.cross_attn.v_proj"), d, dv)?,
            o_proj: l.linear(&format!("{prefix}.cross_attn.o_proj"), d, d)?,
            q_layer_norm: qk_norm("q_layer_norm")?,
            k_layer_norm: qk_norm("k_layer_norm")?,
            post_attention_layernorm: l.rms_norm(
                &format!("{prefix}.post_attention_layernorm"),
                d,
                eps,
            )?,
            mlp: Mlp::load(l, &format!("{prefix}.mlp"), d, cfg.intermediate_size)?,
            alpha_cross_attn: l.weight(&format!("{prefix}.alpha_cross_attn"), gate_shape)?,
            alpha_dense: l.weight(&format!("{prefix}.alpha_dense"), gate_shape)?,
        })
    }

    /// K (already RMS-normalised per head when the config asks) and V of all image tokens `[N*S, D_vision]`.
    pub fn image_kv(&self, b: &B, image_states: &B::Tensor) -> ImageKv<B> {
        let mut k = self.k_proj.forward(b, image_states);
        if let Some(norm) = &self.k_layer_norm {
            k = norm.forward(b, &k);
        }
        ImageKv {
            k,
            v: self.v_proj.forward(b, image_states),
        }
    }

    /// Updates a decoder step's residual stream `h` `[T, D]`; the layout gives each row's image slot in the
    /// media pools `k`, `v` (-1: none).
    pub fn forward(
        &self,
        b: &B,
        h: &mut B::Tensor,
        (k, v): (&B::Tensor, &B::Tensor),
        layout: &B::Layout,
        per_image: usize,
    ) {
        let x = self.input_layernorm.forward(b, h);
        let mut q = self.q_proj.forward(b, &x);
        if let Some(norm) = &self.q_layer_norm {
            q = norm.forward(b, &q);
        }
        let attn = b.cross_attention(&q, k, v, self.heads, layout, per_image);
        b.add_gated(h, &self.o_proj.forward(b, &attn), &self.alpha_cross_attn);
        let m = self
            .mlp
            .forward(b, &self.post_attention_layernorm.forward(b, h));
        b.add_gated(h, &m, &self.alpha_dense);
    }
}
