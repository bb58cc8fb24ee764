//! The MPT decoder block OpenFlamingo-9B and -3B wrap, in both spellings (`MptFlavour`): transformers'
//! `MptBlock` (modeling_mpt.py: `norm_1`, `attn.Wqkv`, `attn.out_proj`, `norm_2`, `ffn.up_proj`/`down_proj`) and
//! MosaicGPT's `GPTBlock` (the hub code of mpt-1b-redpajama-200b: `ln_1`, `attn.Wqkv`, optional `attn.q_ln` and
//! `attn.k_ln` over all of `d_model` before the head split, `attn.out_proj`, `ln_2`, `mlp.mlp_up`/`mlp_down`).
//!
//! ```text
//! h = h + out_proj(causal_attention(q, k, v) with ALiBi)      q|k|v = Wqkv(LN_1(h)), d_model rows each
//! h = h + down(GELU(up(LN_2(h))))                             exact GELU
//! ```
//! No position embeddings; LayerNorms and linears without biases unless MosaicGPT's `no_bias` is false.

use crate::backend::Backend;
use crate::error::Result;
use crate::io::config::{Activation, Alibi};
use crate::io::openflamingo_config::{MptConfig, MptFlavour};
use crate::model::layers::{LayerNorm, Linear, WeightLoader};

pub struct MptBlock<B: Backend> {
    heads: usize,
    alibi: Alibi,
    norm_1: LayerNorm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    q_ln: Option<LayerNorm<B>>,
    k_ln: Option<LayerNorm<B>>,
    out_proj: Linear<B>,
    norm_2: LayerNorm<B>,
    up: Linear<B>,
    down: Linear<B>,
}

impl<B: Backend> MptBlock<B> {
    /// Block `prefix` (`lang_encoder.transformer.blocks.{i}`).
    pub fn load(l: &WeightLoader<B>, prefix: &str, cfg: &MptConfig) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.mlp_width);
        let eps = cfg.layer_norm_eps as f32;
        let norm = |name: &str| match cfg.biases {
            true => l.layer_norm(&format!("{prefix}.{name}"), d, eps),
            false => l.layer_norm_without_bias(&format!("{prefix}.{name}"), d, eps),
        };
        let linear = |name: &str, out: usize, inp: usize| match cfg.biases {
            true => l.linear_bias(&format!("{prefix}.{name}"), out, inp),
            false => l.linear(&format!("{prefix}.{name}"), out, inp),
        };
        let wqkv = (format!("{prefix}.attn.Wqkv.weight"), format!("{prefix}.attn.Wqkv.bias"));
        let qkv = |part: usize| {
            let bias = cfg.biases.then_some(wqkv.1.as_str());
            l.linear_rows((&wqkv.0, bias), (3 * d, d), part * d..(part + 1) * d)
        };
        let (n1, n2, up, down) = match cfg.flavour {
            MptFlavour::Transformers => ("norm_1", "norm_2", "ffn.up_proj", "ffn.down_proj"),
            MptFlavour::MosaicGpt => ("ln_1", "ln_2", "mlp.mlp_up", "mlp.mlp_down"),
        };
        Ok(MptBlock {
            heads: cfg.n_heads,
            alibi: cfg.alibi(),
            norm_1: norm(n1)?,
            q: qkv(0)?,
            k: qkv(1)?,
            v: qkv(2)?,
            q_ln: cfg.qk_ln.then(|| norm("attn.q_ln")).transpose()?,
            k_ln: cfg.qk_ln.then(|| norm("attn.k_ln")).transpose()?,
            out_proj: linear("attn.out_proj", d, d)?,
            norm_2: norm(n2)?,
            up: linear(up, f, d)?,
            down: linear(down, d, f)?,
        })
    }

    /// Runs the block on a decoder step's rows `h` `[T, D]`: writes their K/V into the paged pools at the slots
    /// the layout gives, then attends causally (with ALiBi) over each sequence's cached positions.
    pub fn forward(&self, b: &B, h: &mut B::Tensor, layout: &B::Layout, k_pool: &mut B::Tensor, v_pool: &mut B::Tensor) {
        let x = self.norm_1.forward(b, h);
        let (mut q, mut k, v) = (self.q.forward(b, &x), self.k.forward(b, &x), self.v.forward(b, &x));
        if let (Some(qn), Some(kn)) = (&self.q_ln, &self.k_ln) {
            q = qn.forward(b, &q);
            k = kn.forward(b, &k);
        }
        b.write_kv(k_pool, layout, &k);
        b.write_kv(v_pool, layout, &v);
        let a = b.paged_attention(&q, k_pool, v_pool, self.heads, layout, Some(&self.alibi));
        self.out_proj.forward_into(b, &a, h);
        let m = self.up.forward_activated(b, &self.norm_2.forward(b, h), Activation::Gelu);
        self.down.forward_into(b, &m, h);
    }
}
