//! `MllamaTextModel` (transformers `modeling_mllama.py`): a Llama 3.1 decoder (GQA, llama3-scaled RoPE) whose
//! layers listed in `cross_attention_layers` are `MllamaCrossAttentionDecoderLayer`s instead:
//!
//! ```text
//! h   = x + tanh(attn_gate) * o_proj(row * attn(q_norm(q_proj(RMS x)), images' k_norm(K), V))
//! out = h + tanh(mlp_gate)  * (row * MLP(RMS h))          row = 1 if the row sees an image, else 0 (Meta)
//! ```
//! A row that sees no image passes a cross-attention layer unchanged, so such rows (and text-only requests) skip
//! it. The images' K/V are computed once per image into the media cache (`image_kv`).

use crate::backend::{Backend, StepLayout};
use crate::cache::kv_cache::PagedKvCache;
use crate::cache::media_cache::{ImageKv, MediaCache};
use crate::error::{Error, Result};
use crate::io::mllama_config::MllamaConfig;
use crate::model::layers::{Linear, Mlp, RmsNorm, WeightLoader};
use crate::model::llama::{LlamaDecoderLayer, LlamaDims};

pub struct MllamaCrossAttentionDecoderLayer<B: Backend> {
    heads: usize,
    input_layernorm: RmsNorm<B>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    q_norm: RmsNorm<B>,
    k_norm: RmsNorm<B>,
    cross_attn_attn_gate: B::Weight,
    post_attention_layernorm: RmsNorm<B>,
    mlp: Mlp<B>,
    cross_attn_mlp_gate: B::Weight,
}

pub enum MllamaDecoderLayer<B: Backend> {
    /// `MllamaSelfAttentionDecoderLayer`: a LLaMA layer.
    SelfAttention(LlamaDecoderLayer<B>),
    CrossAttention(MllamaCrossAttentionDecoderLayer<B>),
}

pub struct MllamaTextModel<B: Backend> {
    embed_tokens: B::Weight,
    pub layers: Vec<MllamaDecoderLayer<B>>,
    norm: RmsNorm<B>,
    lm_head: B::Weight,
    embedding_rows: usize,
}

/// Llama 3.2 Vision's self-attention layers: grouped-query attention, llama3-scaled RoPE.
fn llama_dims(cfg: &MllamaConfig) -> LlamaDims {
    let t = &cfg.text_config;
    LlamaDims {
        hidden: t.hidden_size,
        heads: t.num_attention_heads,
        kv_heads: t.num_key_value_heads,
        intermediate: t.intermediate_size,
        rms_norm_eps: t.rms_norm_eps as f32,
        rope: t.rope_frequencies(),
    }
}

/// Consecutive step rows that see the same images, and the media-pool rows they attend to.
struct ImageRun {
    start: usize,
    len: usize,
    keys: Vec<usize>,
}

/// The step's image runs (rows that see no image belong to none), the same for every cross-attention layer.
fn image_runs<B: Backend>(step: &StepLayout, media: &MediaCache<B>) -> Vec<ImageRun> {
    let mut runs: Vec<(usize, usize, u32)> = Vec::new();
    let slots = step.seqs.iter().flat_map(|s| s.image_of_row.iter());
    for (row, &slot) in slots.enumerate() {
        let Ok(slot) = u32::try_from(slot) else { continue };
        match runs.last_mut() {
            Some((start, len, s)) if *s == slot && *start + *len == row => *len += 1,
            _ => runs.push((row, 1, slot)),
        }
    }
    runs.into_iter()
        .map(|(start, len, slot)| ImageRun {
            start,
            len,
            keys: media.visible_rows(slot),
        })
        .collect()
}

impl<B: Backend> MllamaCrossAttentionDecoderLayer<B> {
    fn load(l: &WeightLoader<B>, prefix: &str, cfg: &MllamaConfig) -> Result<Self> {
        let t = &cfg.text_config;
        let (d, kv, hd) = (t.hidden_size, t.kv_width(), t.head_dim());
        let eps = t.rms_norm_eps as f32;
        let a = |name: &str| format!("{prefix}.cross_attn.{name}");
        Ok(MllamaCrossAttentionDecoderLayer {
            heads: t.num_attention_heads,
            input_layernorm: l.rms_norm(&format!("{prefix}.input_layernorm"), d, eps)?,
            q_proj: l.linear(&a("q_proj"), d, d)?,
            k_proj: l.linear(&a("k_proj"), kv, d)?,
            v_proj: l.linear(&a("v_proj"), kv, d)?,
            o_proj: l.linear(&a("o_proj"), d, d)?,
            q_norm: l.rms_norm(&a("q_norm"), hd, eps)?,
            k_norm: l.rms_norm(&a("k_norm"), hd, eps)?,
            cross_attn_attn_gate: l.weight(&format!("{prefix}.cross_attn_attn_gate"), &[1])?,
            post_attention_layernorm: l.rms_norm(&format!("{prefix}.post_attention_layernorm"), d, eps)?,
            mlp: Mlp::load(l, &format!("{prefix}.mlp"), d, t.intermediate_size)?,
            cross_attn_mlp_gate: l.weight(&format!("{prefix}.cross_attn_mlp_gate"), &[1])?,
        })
    }

    /// K (k_norm-ed per head) and V of projected image states `[N, hidden]`, as the media cache keeps them.
    pub fn image_kv(&self, b: &B, states: &B::Tensor) -> ImageKv<B> {
        ImageKv {
            k: self.k_norm.forward(b, &self.k_proj.forward(b, states)),
            v: self.v_proj.forward(b, states),
        }
    }

    /// Updates the rows of `h` that see an image; the others pass unchanged.
    fn forward(
        &self,
        b: &B,
        h: &mut B::Tensor,
        runs: &[ImageRun],
        (k_pool, v_pool): (&B::Tensor, &B::Tensor),
    ) {
        for run in runs {
            let (k, v) = (b.gather_rows(k_pool, &run.keys), b.gather_rows(v_pool, &run.keys));
            let mut x = b.slice_rows(h, run.start, run.len);
            let q = self.q_norm.forward(b, &self.q_proj.forward(b, &self.input_layernorm.forward(b, &x)));
            let attn = b.attention(&q, &k, &v, self.heads);
            b.add_gated(&mut x, &self.o_proj.forward(b, &attn), &self.cross_attn_attn_gate);
            let m = self.mlp.forward(b, &self.post_attention_layernorm.forward(b, &x));
            b.add_gated(&mut x, &m, &self.cross_attn_mlp_gate);
            b.write_rows(h, run.start, &x);
        }
    }
}

impl<B: Backend> MllamaTextModel<B> {
    pub fn load(l: &WeightLoader<B>, cfg: &MllamaConfig) -> Result<Self> {
        let t = &cfg.text_config;
        let d = t.hidden_size;
        let layers = (0..t.num_hidden_layers)
            .map(|i| {
                let prefix = format!("language_model.model.layers.{i}");
                Ok(if t.cross_attention_layers.contains(&i) {
                    MllamaDecoderLayer::CrossAttention(MllamaCrossAttentionDecoderLayer::load(l, &prefix, cfg)?)
                } else {
                    MllamaDecoderLayer::SelfAttention(LlamaDecoderLayer::load(l, &prefix, &llama_dims(cfg))?)
                })
            })
            .collect::<Result<_>>()?;
        Ok(MllamaTextModel {
            embed_tokens: l.weight("language_model.model.embed_tokens.weight", &[cfg.embedding_rows(), d])?,
            layers,
            norm: l.rms_norm("language_model.model.norm", d, t.rms_norm_eps as f32)?,
            lm_head: l.weight("language_model.lm_head.weight", &[t.vocab_size, d])?,
            embedding_rows: cfg.embedding_rows(),
        })
    }

    /// The cross-attention layers' K/V of projected image states, in layer order (one media-cache block each).
    pub fn cross_kv(&self, b: &B, states: &B::Tensor) -> Vec<ImageKv<B>> {
        self.cross_layers().map(|x| x.image_kv(b, states)).collect()
    }

    pub fn cross_layers(&self) -> impl Iterator<Item = &MllamaCrossAttentionDecoderLayer<B>> {
        self.layers.iter().filter_map(|l| match l {
            MllamaDecoderLayer::CrossAttention(x) => Some(x),
            MllamaDecoderLayer::SelfAttention(_) => None,
        })
    }

    /// One decoder step (see [`crate::model::Model::forward`]); `step` is the host view of `layout`, whose
    /// image slots the cross-attention layers read. With `hidden_states`: the embeddings, the state after every
    /// layer but the last, and the final-normed output (transformers' `hidden_states`).
    pub fn forward(
        &self,
        b: &B,
        ids: &[u32],
        step: &StepLayout,
        layout: &B::Layout,
        kv: &mut PagedKvCache<B>,
        media: &MediaCache<B>,
        mut hidden_states: Option<&mut Vec<B::Tensor>>,
    ) -> Result<B::Tensor> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.embedding_rows) {
            return Err(Error::TokenOutOfRange {
                id,
                token: String::new(),
                rows: self.embedding_rows,
            });
        }
        let mut h = b.embedding(ids, &self.embed_tokens, None)?;
        let mut record = |h: &B::Tensor| {
            if let Some(hs) = hidden_states.as_deref_mut() {
                hs.push(b.slice_rows(h, 0, ids.len()));
            }
        };
        record(&h);
        let runs = image_runs(step, media);
        let (mut self_idx, mut cross_idx) = (0, 0);
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            match layer {
                MllamaDecoderLayer::SelfAttention(x) => {
                    let (k_pool, v_pool) = kv.layer_mut(self_idx);
                    x.forward(b, &mut h, layout, k_pool, v_pool);
                    self_idx += 1;
                }
                MllamaDecoderLayer::CrossAttention(x) => {
                    x.forward(b, &mut h, &runs, media.block(cross_idx));
                    cross_idx += 1;
                }
            }
            if i < last {
                record(&h);
            }
        }
        let h = self.norm.forward(b, &h);
        record(&h);
        Ok(h)
    }

    pub fn logits(&self, b: &B, h: &B::Tensor) -> B::Tensor {
        b.linear(h, &self.lm_head, None)
    }
}
