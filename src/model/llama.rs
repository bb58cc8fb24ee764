//! The LLaMA decoder layer both families' language models are made of (IDEFICS' `IdeficsDecoderLayer`, Llama 3.2
//! Vision's `MllamaSelfAttentionDecoderLayer`): pre-RMSNorm, self-attention with rotate-half RoPE on q and k
//! (grouped-query when the keys have fewer heads), SwiGLU MLP, no biases.

use crate::backend::Backend;
use crate::error::Result;
use crate::io::config::RopeFrequencies;
use crate::model::layers::{Linear, Mlp, RmsNorm, WeightLoader};

/// The shape of a LLaMA layer, as a family's config gives it.
#[derive(Clone, Copy, Debug)]
pub struct LlamaDims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub rms_norm_eps: f32,
    pub rope: RopeFrequencies,
}

pub struct LlamaDecoderLayer<B: Backend> {
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

impl<B: Backend> LlamaDecoderLayer<B> {
    pub fn load(l: &WeightLoader<B>, prefix: &str, dims: &LlamaDims) -> Result<Self> {
        let d = dims.hidden;
        let head_dim = d / dims.heads;
        let kv = dims.kv_heads * head_dim;
        let eps = dims.rms_norm_eps;
        Ok(LlamaDecoderLayer {
            heads: dims.heads,
            head_dim,
            rope: dims.rope,
            input_layernorm: l.rms_norm(&format!("{prefix}.input_layernorm"), d, eps)?,
            q_proj: l.linear(&format!("{prefix}.self_attn.q_proj"), d, d)?,
            k_proj: l.linear(&format!("{prefix}.self_attn.k_proj"), kv, d)?,
            v_proj: l.linear(&format!("{prefix}.self_attn.v_proj"), kv, d)?,
            o_proj: l.linear(&format!("{prefix}.self_attn.o_proj"), d, d)?,
            post_attention_layernorm: l.rms_norm(&format!("{prefix}.post_attention_layernorm"), d, eps)?,
            mlp: Mlp::load(l, &format!("{prefix}.mlp"), d, dims.intermediate)?,
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
        let a = b.paged_attention(&q, k_pool, v_pool, self.heads, layout, None);
        self.o_proj.forward_into(b, &a, h);
        let x = self.post_attention_layernorm.forward(b, h);
        self.mlp.forward_into(b, &x, h);
    }
}
