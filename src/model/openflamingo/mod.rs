//! OpenFlamingo (open_flamingo 2.0.1 `src/`), one file per part, names as in its code and open_clip's: `vision`
//! (open_clip's `VisionTransformer`), `perceiver` (`PerceiverResampler`), `mpt` (the MPT and MosaicGPT decoder
//! block), `gpt_neox` (the GPT-NeoX layer), `cross_attention` (`GatedCrossAttentionBlock`). This file ties them
//! together as `Flamingo` does (flamingo.py, flamingo_lm.py): the checkpoint's embeddings replacing the language
//! model's, a gated block before decoder layer `i` where the checkpoint has one, the LM head tied to the
//! embeddings (MPT) or the checkpoint's `embed_out` (GPT-NeoX).

pub mod cross_attention;
pub mod gpt_neox;
pub mod mpt;
pub mod perceiver;
pub mod vision;

use crate::backend::{Backend, StepLayout};
use crate::cache::kv_cache::PagedKvCache;
use crate::cache::media_cache::{ImageKv, MediaCache};
use crate::error::{Error, Result};
use crate::io::image::PreparedImage;
use crate::io::openflamingo_config::{DecoderConfig, MptFlavour, OpenClipConfig};
use crate::io::safetensors::WeightStore;
use crate::model::layers::{LayerNorm, WeightLoader};
use crate::model::Model;
use cross_attention::GatedCrossAttentionBlock;
use gpt_neox::GptNeoxLayer;
use mpt::MptBlock;
use perceiver::PerceiverResampler;
use vision::VisionTransformer;

/// What OpenFlamingo makes of images: the vision encoder's patch tokens, resampled to 64 latents each.
pub struct OpenFlamingoMedia<B: Backend> {
    vision_encoder: VisionTransformer<B>,
    perceiver: PerceiverResampler<B>,
}

impl<B: Backend> OpenFlamingoMedia<B> {
    /// From a store named as OpenFlamingo's state dict (`vision_encoder.*`, `perceiver.*`:
    /// `OpenFlamingoParts::open_store`).
    pub fn load(l: &WeightLoader<B>, vision: &OpenClipConfig) -> Result<Self> {
        Ok(OpenFlamingoMedia {
            vision_encoder: VisionTransformer::load(l, "vision_encoder", vision)?,
            perceiver: PerceiverResampler::load(l, "perceiver", vision.vision.width)?,
        })
    }

    /// One image's vision tokens `[patches, width]` from its pixels `[3, S, S]`.
    pub fn vision_tokens(&self, b: &B, pixels: &[f32]) -> B::Tensor {
        self.vision_encoder.forward(b, pixels)
    }

    /// One image's latents `[64, width]` from its vision tokens.
    pub fn resample(&self, b: &B, tokens: &B::Tensor) -> B::Tensor {
        self.perceiver.forward(b, tokens)
    }
}

/// The decoder layers of the language model, of one kind.
enum Layers<B: Backend> {
    Mpt(Vec<MptBlock<B>>),
    GptNeox(Vec<GptNeoxLayer<B>>),
}

/// Where the LM head's weight is.
enum LmHead<B: Backend> {
    /// MPT and MosaicGPT: the input embeddings.
    Tied,
    /// GPT-NeoX: the checkpoint's `embed_out`.
    Own(B::Weight),
}

pub struct OpenFlamingo<B: Backend> {
    pub vision: OpenClipConfig,
    pub decoder: DecoderConfig,
    media: OpenFlamingoMedia<B>,
    embed: B::Weight,
    vocab: usize,
    /// Per decoder layer: its gated block (run before it), where the checkpoint has one.
    cross: Vec<Option<GatedCrossAttentionBlock<B>>>,
    layers: Layers<B>,
    final_norm: LayerNorm<B>,
    lm_head: LmHead<B>,
}

impl<B: Backend> OpenFlamingo<B> {
    /// From a store named as OpenFlamingo's state dict (`OpenFlamingoParts::open_store`).
    pub fn load(backend: &B, store: &WeightStore, vision: &OpenClipConfig, decoder: &DecoderConfig, show_progress: bool) -> Result<Self> {
        let l = WeightLoader::new(store, backend, show_progress);
        let (stack, embed_name, width, n_layers) = match decoder {
            DecoderConfig::Mpt(c) => ("transformer.blocks", "lang_encoder.transformer.wte.weight", c.d_model, c.n_layers),
            DecoderConfig::GptNeox(c) => ("gpt_neox.layers", "lang_encoder.gpt_neox.embed_in.weight", c.hidden_size, c.num_hidden_layers),
        };
        // The checkpoint's embeddings, resized to the tokenizer: their rows are the vocabulary.
        let vocab = store.get_any_shape(embed_name)?.shape[0];
        let cross = (0..n_layers)
            .map(|i| {
                let prefix = format!("lang_encoder.{stack}.{i}.gated_cross_attn_layer");
                let present = store.get_any_shape(&format!("{prefix}.attn_gate")).is_ok();
                present.then(|| GatedCrossAttentionBlock::load(&l, &prefix, width, vision.vision.width)).transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        if cross.iter().all(Option::is_none) {
            return Err(Error::MissingTensor {
                name: format!("lang_encoder.{stack}.<i>.gated_cross_attn_layer.attn_gate"),
                searched: "the checkpoint (no decoder layer has a gated cross-attention block)".into(),
            });
        }
        let (layers, final_norm, lm_head) = match decoder {
            DecoderConfig::Mpt(c) => {
                let blocks = (0..n_layers)
                    .map(|i| MptBlock::load(&l, &format!("lang_encoder.{stack}.{i}"), c))
                    .collect::<Result<_>>()?;
                let name = match c.flavour {
                    MptFlavour::Transformers => "lang_encoder.transformer.norm_f",
                    MptFlavour::MosaicGpt => "lang_encoder.transformer.ln_f",
                };
                let eps = c.layer_norm_eps as f32;
                let norm = match c.biases {
                    true => l.layer_norm(name, width, eps)?,
                    false => l.layer_norm_without_bias(name, width, eps)?,
                };
                (Layers::Mpt(blocks), norm, LmHead::Tied)
            }
            DecoderConfig::GptNeox(c) => {
                let layers = (0..n_layers)
                    .map(|i| GptNeoxLayer::load(&l, &format!("lang_encoder.{stack}.{i}"), c))
                    .collect::<Result<_>>()?;
                let norm = l.layer_norm("lang_encoder.gpt_neox.final_layer_norm", width, c.layer_norm_eps as f32)?;
                let head = l.weight("lang_encoder.embed_out.weight", &[vocab, width])?;
                (Layers::GptNeox(layers), norm, LmHead::Own(head))
            }
        };
        let model = OpenFlamingo {
            vision: vision.clone(),
            decoder: decoder.clone(),
            media: OpenFlamingoMedia::load(&l, vision)?,
            embed: l.weight(embed_name, &[vocab, width])?,
            vocab,
            cross,
            layers,
            final_norm,
            lm_head,
        };
        l.finish();
        Ok(model)
    }

    /// The vision encoder and resampler.
    pub fn media(&self) -> &OpenFlamingoMedia<B> {
        &self.media
    }

    fn width(&self) -> usize {
        match &self.decoder {
            DecoderConfig::Mpt(c) => c.d_model,
            DecoderConfig::GptNeox(c) => c.hidden_size,
        }
    }

    fn n_layers(&self) -> usize {
        self.cross.len()
    }
}


impl<B: Backend> Model<B> for OpenFlamingo<B> {
    fn context_len(&self) -> usize {
        self.decoder.context_len()
    }

    fn vocab_rows(&self) -> usize {
        self.vocab
    }

    fn head_dim(&self) -> usize {
        match &self.decoder {
            DecoderConfig::Mpt(c) => c.head_dim(),
            DecoderConfig::GptNeox(c) => c.head_dim(),
        }
    }

    fn kv_layout(&self) -> (usize, usize) {
        (self.n_layers(), self.width())
    }

    fn new_kv_cache(&self, b: &B, blocks: usize, block_size: usize) -> PagedKvCache<B> {
        let (layers, width) = self.kv_layout();
        PagedKvCache::new(b, layers, blocks, block_size, width)
    }

    fn media_layout(&self) -> (usize, usize, usize) {
        let blocks = self.cross.iter().flatten().count();
        (blocks, perceiver::LATENTS, cross_attention::HEADS * cross_attention::DIM_HEAD)
    }

    fn new_media_cache(&self, b: &B, slots: usize) -> MediaCache<B> {
        let (blocks, tokens, width) = self.media_layout();
        MediaCache::new(b, blocks, slots, tokens, width)
    }

    /// Each image's 64 latents, images in order: `[images * 64, vision width]`.
    fn encode_images(&self, b: &B, images: &[PreparedImage]) -> B::Tensor {
        let _range = crate::nvtx::range("vision");
        let mut states = b.zeros(0, self.vision.vision.width);
        for image in images {
            let latents = self.media.resample(b, &self.media.vision_tokens(b, &image.pixels));
            states = b.concat_rows(&states, &latents);
        }
        states
    }

    fn visible_tokens(&self, _image: &PreparedImage) -> usize {
        perceiver::LATENTS
    }

    fn cross_kv(&self, b: &B, states: &B::Tensor) -> Vec<ImageKv<B>> {
        self.cross.iter().flatten().map(|x| x.image_kv(b, states)).collect()
    }

    /// With `hidden_states`, also what OpenFlamingo's goldens call `hidden_states.N`: the embeddings, then each
    /// wrapped layer's output (gated block, then decoder layer), the last before the final norm.
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
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::TokenOutOfRange { id, token: String::new(), rows: self.vocab });
        }
        let mut h = b.embedding(ids, &self.embed, None)?;
        let mut record = |h: &B::Tensor| {
            if let Some(hs) = hidden_states.as_deref_mut() {
                hs.push(b.slice_rows(h, 0, ids.len()));
            }
        };
        record(&h);
        let mut block = 0;
        for i in 0..self.n_layers() {
            if let Some(x) = &self.cross[i] {
                x.forward(b, &mut h, media.block(block), layout, media.tokens_per_image());
                block += 1;
            }
            let (k_pool, v_pool) = kv.layer_mut(i);
            match &self.layers {
                Layers::Mpt(layers) => layers[i].forward(b, &mut h, layout, k_pool, v_pool),
                Layers::GptNeox(layers) => layers[i].forward(b, &mut h, layout, k_pool, v_pool),
            }
            record(&h);
        }
        Ok(self.final_norm.forward(b, &h))
    }

    fn logits(&self, b: &B, h: &B::Tensor) -> B::Tensor {
        match &self.lm_head {
            LmHead::Tied => b.linear(h, &self.embed, None),
            LmHead::Own(w) => b.linear(h, w, None),
        }
    }
}
