//! The GPT-NeoX decoder layer OpenFlamingo-4B wraps (transformers `modeling_gpt_neox.py` `GPTNeoXLayer`):
//! `attention.query_key_value` viewed `[T, H, 3 * head_dim]`, so each head's q, k and v rows interleave (split at
//! load); rotary embedding on the first `rotary_ndims` of each head's q and k; biases on every linear and
//! LayerNorm; exact-GELU MLP.
//!
//! ```text
//! parallel:    h = h + attn(LN_1(h)) + mlp(LN_2(h))
//! sequential:  h = h + attn(LN_1(h));  h = h + mlp(LN_2(h))      (RedPajama-INCITE-3B: use_parallel_residual false)
//! ```

use crate::backend::Backend;
use crate::error::Result;
use crate::io::config::{Activation, RopeFrequencies};
use crate::io::openflamingo_config::GptNeoxConfig;
use crate::model::layers::{LayerNorm, Linear, WeightLoader};

pub struct GptNeoxLayer<B: Backend> {
    heads: usize,
    head_dim: usize,
    rope: RopeFrequencies,
    parallel_residual: bool,
    input_layernorm: LayerNorm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    dense: Linear<B>,
    post_attention_layernorm: LayerNorm<B>,
    dense_h_to_4h: Linear<B>,
    dense_4h_to_h: Linear<B>,
}

impl<B: Backend> GptNeoxLayer<B> {
    /// Layer `prefix` (`lang_encoder.gpt_neox.layers.{i}`).
    pub fn load(l: &WeightLoader<B>, prefix: &str, cfg: &GptNeoxConfig) -> Result<Self> {
        let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let eps = cfg.layer_norm_eps as f32;
        let qkv = (
            format!("{prefix}.attention.query_key_value.weight"),
            format!("{prefix}.attention.query_key_value.bias"),
        );
        // Part p (0 q, 1 k, 2 v) of every head: rows h * 3hd + p * hd ..
        let part = |p: usize| {
            let ranges: Vec<_> = (0..cfg.num_attention_heads)
                .map(|h| (3 * h + p) * hd..(3 * h + p + 1) * hd)
                .collect();
            l.linear_row_ranges((&qkv.0, Some(&qkv.1)), (3 * d, d), &ranges)
        };
        Ok(GptNeoxLayer {
            heads: cfg.num_attention_heads,
            head_dim: hd,
            rope: RopeFrequencies {
                rotary_dims: Some(cfg.rotary_ndims),
                ..RopeFrequencies::plain(cfg.rotary_emb_base)
            },
            parallel_residual: cfg.use_parallel_residual,
            input_layernorm: l.layer_norm(&format!("{prefix}.input_layernorm"), d, eps)?,
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            dense: l.linear_bias(&format!("{prefix}.attention.dense"), d, d)?,
            post_attention_layernorm: l.layer_norm(&format!("{prefix}.post_attention_layernorm"), d, eps)?,
            dense_h_to_4h: l.linear_bias(&format!("{prefix}.mlp.dense_h_to_4h"), f, d)?,
            dense_4h_to_h: l.linear_bias(&format!("{prefix}.mlp.dense_4h_to_h"), d, f)?,
        })
    }

    /// Runs the layer on a decoder step's rows `h` `[T, D]` (K/V into the paged pools, causal attention).
    pub fn forward(&self, b: &B, h: &mut B::Tensor, layout: &B::Layout, k_pool: &mut B::Tensor, v_pool: &mut B::Tensor) {
        let x = self.input_layernorm.forward(b, h);
        // The parallel MLP reads the layer's input, so its norm is taken before the attention adds to `h`.
        let mlp_input = self.parallel_residual.then(|| self.post_attention_layernorm.forward(b, h));
        let (mut q, mut k, v) = (self.q.forward(b, &x), self.k.forward(b, &x), self.v.forward(b, &x));
        b.rope(&mut q, &mut k, self.head_dim, layout, &self.rope);
        b.write_kv(k_pool, layout, &k);
        b.write_kv(v_pool, layout, &v);
        let a = b.paged_attention(&q, k_pool, v_pool, self.heads, layout, None);
        self.dense.forward_into(b, &a, h);
        let x = mlp_input.unwrap_or_else(|| self.post_attention_layernorm.forward(b, h));
        let m = self.dense_h_to_4h.forward_activated(b, &x, Activation::Gelu);
        self.dense_4h_to_h.forward_into(b, &m, h);
    }
}
