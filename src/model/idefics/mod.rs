//! The IDEFICS model (`IdeficsForVisionText2Text`, transformers' `modeling_idefics.py`), one file per part, names as
//! in transformers: `vision` (ViT), `resampler` (Perceiver), `cross_attention` (gated cross-attention block);
//! the decoder layers are `model::llama`'s; `synthetic` makes random-weight models of the published shapes for benchmarks. This
//! file ties the parts together.

pub mod cross_attention;
pub mod resampler;
pub mod synthetic;
pub mod vision;

use crate::backend::{Backend, StepLayout};
use crate::cache::kv_cache::PagedKvCache;
use crate::cache::media_cache::{ImageKv, MediaCache};
use crate::error::{Error, Result};
use crate::io::config::{IdeficsConfig, RopeFrequencies};
use crate::io::image::PreparedImage;
use crate::io::safetensors::WeightStore;
use crate::model::layers::{optional, RmsNorm, WeightLoader};
use crate::model::llama::{LlamaDecoderLayer, LlamaDims};
use crate::model::Model;
use cross_attention::IdeficsGatedCrossAttentionLayer;
use resampler::IdeficsPerceiverResampler;
use vision::IdeficsVisionTransformer;

pub struct Idefics<B: Backend> {
    pub config: IdeficsConfig,
    embed_tokens: B::Weight,
    additional_embedding: Option<B::Weight>,
    vision: IdeficsVisionTransformer<B>,
    resampler: Option<IdeficsPerceiverResampler<B>>,
    cross_layers: Vec<IdeficsGatedCrossAttentionLayer<B>>,
    layers: Vec<LlamaDecoderLayer<B>>,
    norm: RmsNorm<B>,
    lm_head: B::Weight,
    additional_fc: Option<B::Weight>,
}

/// IDEFICS' LLaMA: multi-head attention (as many kv heads as heads), plain RoPE.
fn llama_dims(cfg: &IdeficsConfig) -> LlamaDims {
    LlamaDims {
        hidden: cfg.hidden_size,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_attention_heads,
        intermediate: cfg.intermediate_size,
        rms_norm_eps: cfg.rms_norm_eps as f32,
        rope: RopeFrequencies::plain(cfg.rope_theta()),
    }
}

impl<B: Backend> Idefics<B> {
    pub fn load(
        backend: &B,
        store: &WeightStore,
        cfg: &IdeficsConfig,
        show_progress: bool,
    ) -> Result<Self> {
        let l = WeightLoader::new(store, backend, show_progress);
        let (d, v, a) = (cfg.hidden_size, cfg.vocab_size, cfg.additional_vocab_size);
        let extra = |name: &str| optional(a > 0, || l.weight(name, &[a, d]));
        let model = Idefics {
            config: cfg.clone(),
            embed_tokens: l.weight("model.embed_tokens.weight", &[v, d])?,
            additional_embedding: extra("model.embed_tokens.additional_embedding.weight")?,
            vision: IdeficsVisionTransformer::load(&l, "model.vision_model", &cfg.vision_config)?,
            resampler: optional(cfg.use_resampler, || {
                IdeficsPerceiverResampler::load(
                    &l,
                    "model.perceiver_resampler",
                    &cfg.perceiver_config,
                    &cfg.vision_config,
                )
            })?,
            cross_layers: (0..cfg.num_cross_layers())
                .map(|i| {
                    IdeficsGatedCrossAttentionLayer::load(
                        &l,
                        &format!("model.gated_cross_attn_layers.{i}"),
                        cfg,
                    )
                })
                .collect::<Result<_>>()?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| LlamaDecoderLayer::load(&l, &format!("model.layers.{i}"), &llama_dims(cfg)))
                .collect::<Result<_>>()?,
            norm: l.rms_norm("model.norm", d, cfg.rms_norm_eps as f32)?,
            lm_head: l.weight("lm_head.weight", &[v, d])?,
            additional_fc: extra("lm_head.additional_fc.weight")?,
        };
        l.finish();
        Ok(model)
    }

    /// The vision encoder's output for one image `[3, S, S]`: `[1 + patches, D_vision]`.
    pub fn vision_states(&self, b: &B, pixels: &[f32]) -> B::Tensor {
        self.vision.forward(b, pixels)
    }

    /// What the cross-attention sees of one image: the resampler's latents, or the raw vision tokens without one.
    pub fn image_states_from_vision(&self, b: &B, vision_states: &B::Tensor) -> B::Tensor {
        match &self.resampler {
            Some(r) => r.forward(b, vision_states),
            None => b.slice_rows(vision_states, 0, b.dims(vision_states).0),
        }
    }
}

impl<B: Backend> Model<B> for Idefics<B> {
    fn context_len(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn vocab_rows(&self) -> usize {
        self.config.total_vocab()
    }

    fn head_dim(&self) -> usize {
        self.config.head_dim()
    }

    /// What the cross-attention sees of a request's images (each `[3, S, S]`):
    /// `[images * tokens_per_image, D_vision]`.
    fn encode_images(&self, b: &B, images: &[PreparedImage]) -> B::Tensor {
        let _range = crate::nvtx::range("vision");
        let width = self.config.vision_config.embed_dim;
        let mut states = b.zeros(0, width);
        for image in images {
            let one = self.image_states_from_vision(b, &self.vision_states(b, &image.pixels));
            states = b.concat_rows(&states, &one);
        }
        states
    }

    fn visible_tokens(&self, _image: &PreparedImage) -> usize {
        self.config.image_tokens_per_image()
    }

    /// Every cross-attention block's K/V of image states `[images * tokens_per_image, D_vision]` (one matrix
    /// product per block for all the images given, whichever requests they belong to).
    fn cross_kv(&self, b: &B, states: &B::Tensor) -> Vec<ImageKv<B>> {
        self.cross_layers
            .iter()
            .map(|x| x.image_kv(b, states))
            .collect()
    }

    fn media_layout(&self) -> (usize, usize, usize) {
        let c = &self.config;
        (self.cross_layers.len(), c.image_tokens_per_image(), c.hidden_size)
    }

    /// A media cache with room for `slots` images.
    fn new_media_cache(&self, b: &B, slots: usize) -> MediaCache<B> {
        let (blocks, tokens, width) = self.media_layout();
        MediaCache::new(b, blocks, slots, tokens, width)
    }

    fn kv_layout(&self) -> (usize, usize) {
        (self.config.num_hidden_layers, self.config.hidden_size)
    }

    /// A paged KV cache of `blocks` blocks of `block_size` positions.
    fn new_kv_cache(&self, b: &B, blocks: usize, block_size: usize) -> PagedKvCache<B> {
        let (layers, width) = self.kv_layout();
        PagedKvCache::new(b, layers, blocks, block_size, width)
    }

    /// Runs one decoder step: `ids` are the rows of the step's sequences in layout order; their K/V go into `kv`
    /// at the slots the layout gives, and they see their images through `media`. Returns the final-normed hidden
    /// states `[T, D]`. With `hidden_states`, also collects what transformers reports as `hidden_states`: the
    /// input of the first decoder layer (after the first cross-attention block), the output of every other layer
    /// but the last, and the final-normed output.
    fn forward(
        &self,
        b: &B,
        ids: &[u32],
        _step: &StepLayout,
        layout: &B::Layout,
        kv: &mut PagedKvCache<B>,
        media: &MediaCache<B>,
        mut hidden_states: Option<&mut Vec<B::Tensor>>,
    ) -> Result<B::Tensor> {
        let rows = self.config.total_vocab();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(Error::TokenOutOfRange {
                id,
                token: String::new(),
                rows,
            });
        }
        let mut h = b.embedding(ids, &self.embed_tokens, self.additional_embedding.as_ref())?;
        let interval = self.config.cross_layer_interval;
        let last = self.layers.len() - 1;
        let mut record = |h: &B::Tensor| {
            if let Some(hs) = hidden_states.as_deref_mut() {
                hs.push(b.slice_rows(h, 0, ids.len()));
            }
        };
        for (idx, layer) in self.layers.iter().enumerate() {
            if idx % interval == 0 {
                if let Some(x) = self.cross_layers.get(idx / interval) {
                    let pools = media.block(idx / interval);
                    x.forward(b, &mut h, pools, layout, media.tokens_per_image());
                }
            }
            if idx == 0 {
                record(&h);
            }
            let (k_pool, v_pool) = kv.layer_mut(idx);
            layer.forward(b, &mut h, layout, k_pool, v_pool);
            if idx < last {
                record(&h);
            }
        }
        let h = self.norm.forward(b, &h);
        record(&h);
        Ok(h)
    }

    /// Decoupled LM head: `[h W^T , h W_additional^T]`, `vocab_size + additional_vocab_size` logits per row.
    fn logits(&self, b: &B, h: &B::Tensor) -> B::Tensor {
        let base = b.linear(h, &self.lm_head, None);
        match &self.additional_fc {
            Some(extra) => b.concat_cols(&base, &b.linear(h, extra, None)),
            None => base,
        }
    }
}
