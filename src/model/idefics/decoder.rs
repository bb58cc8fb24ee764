//! The LLaMA decoder layer of IDEFICS (`IdeficsDecoderLayer`): pre-RMSNorm, multi-head self-attention with
//! rotate-half RoPE on q and k, SwiGLU MLP, no biases.

use crate::backend::Backend;
use crate::error::Result;
use crate::io::config::{IdeficsConfig, RopeFrequencies};
use crate::model::layers::{Linear, Mlp, RmsNorm, WeightLoader};

pub struct IdeficsDecoderLayer<B: Backend> {
    heads: usize,
    head_dim: usize,
    rope: RopeFrequencies,
    input_layernorm: RmsNorm<B>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    post_attention_layernorm: RmsNorm<B>,
    mlp: Mlp<B>,
}

impl<B: Backend> IdeficsDecoderLayer<B> {
    pub fn load(l: &WeightLoader<B>, prefix: &str, cfg: &IdeficsConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.rms_norm_eps as f32;
        Ok(IdeficsDecoderLayer {
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            rope: RopeFrequencies::plain(cfg.rope_theta()),
            input_layernorm: l.rms_norm(&format!("{prefix}.input_layernorm"), d, eps)?,
            q_proj: l.linear(&format!("{prefix}.self_attn.q_proj"), d, d)?,
            k_proj: l.linear(&format!("{prefix}.self_attn.k_proj"), d, d)?,
            v_proj: l.linear(&format!("{prefix}.self_attn.v_proj"), d, d)?,
            o_proj: l.linear(&format!("{prefix}.self_attn.o_proj"), d, d)?,
            post_attention_layernorm: l.rms_norm(
                &format!("{prefix}.post_attention_layernorm"),
                d,
                eps,
            )?,
            mlp: Mlp::load(l, &format!("{prefix}.mlp"), d, cfg.intermediate_size)?,
        })
    }

    /// Runs the layer on a decoder step's rows `h` `[T, D]`: writes their K/V into the paged pools at the slots
    /// the layout gives, then attends causally over each sequence's cached positions.
    pub fn forward(
        &self,
        b: &B,
        h: &mut B::Tensor,
        layout: &B::Layout,
        k_pool: &mut B::Tensor,
        v_pool: &mut B::Tensor,
    ) {
        let x = self.input_layernorm.forward(b, h);
        let mut q = self.q_proj.forward(b, &x);
        let mut k = self.k_proj.forward(b, &x);
        let v = self.v_proj.forward(b, &x);
        b.rope(&mut q, &mut k, self.head_dim, layout, &self.rope);
        b.write_kv(k_pool, layout, &k);
        b.write_kv(v_pool, layout, &v);
        let a = b.paged_attention(&q, k_pool, v_pool, self.heads, layout);
        b.add_assign(h, &self.o_proj.forward(b, &a));
        let m = self
            .mlp
            .forward(b, &self.post_attention_layernorm.forward(b, h));
        b.add_assign(h, &m);
    }
}
