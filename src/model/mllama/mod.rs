//! Llama 3.2 Vision (`MllamaForConditionalGeneration`, transformers' `modeling_mllama.py`), one file per part,
//! names as in transformers: `vision` (the tiled vision tower), `text` (the decoder with its cross-attention
//! layers). Where transformers 5.23 deviates from Meta's reference implementation, the model follows Meta's, as
//! it was trained (see `../shared/fixtures/MLLAMA.md`): vision intermediate features are layer inputs, and rows
//! that see no image pass the cross-attention layers unchanged.

pub mod text;
pub mod vision;

use crate::backend::Backend;
use crate::cache::kv_cache::PagedKvCache;
use crate::cache::media_cache::{ImageKv, MediaCache, SlotView};
use crate::error::Result;
use crate::io::mllama_config::MllamaConfig;
use crate::io::mllama_image::TiledImage;
use crate::io::safetensors::WeightStore;
use crate::model::layers::{Linear, WeightLoader};
use text::MllamaTextModel;
use vision::{MllamaVisionModel, VisionTrace};

pub struct Mllama<B: Backend> {
    pub config: MllamaConfig,
    pub vision_model: MllamaVisionModel<B>,
    multi_modal_projector: Linear<B>,
    pub language_model: MllamaTextModel<B>,
}

impl<B: Backend> Mllama<B> {
    pub fn load(backend: &B, store: &WeightStore, cfg: &MllamaConfig, show_progress: bool) -> Result<Self> {
        let l = WeightLoader::new(store, backend, show_progress);
        let v = &cfg.vision_config;
        let model = Mllama {
            config: cfg.clone(),
            vision_model: MllamaVisionModel::load(&l, "vision_model", v)?,
            multi_modal_projector: l.linear_bias(
                "multi_modal_projector",
                cfg.text_config.hidden_size,
                v.vision_output_dim,
            )?,
            language_model: MllamaTextModel::load(&l, cfg)?,
        };
        l.finish();
        Ok(model)
    }

    /// Key rows of one image in the media cache: every tile's tokens, used or not (`max_num_tiles * P`).
    pub fn tokens_per_image(&self) -> usize {
        self.config.vision_config.max_num_tiles * self.config.vision_config.tokens_per_tile()
    }

    /// The key rows of an image the cross-attention reads: those of its used tiles.
    pub fn visible_tokens(&self, image: &TiledImage) -> usize {
        image.num_tiles() * self.config.vision_config.tokens_per_tile()
    }

    /// One image's vision trace and its projected states `[max_num_tiles * P, hidden]` (the cross-attention
    /// states).
    pub fn encode_image(&self, b: &B, image: &TiledImage) -> Result<(VisionTrace<B>, B::Tensor)> {
        let trace = self.vision_model.forward(b, image)?;
        let states = self.multi_modal_projector.forward(b, &trace.last_hidden_state);
        Ok((trace, states))
    }

    /// Cross-attention states of several images, stacked `[images * tokens_per_image, hidden]`.
    pub fn encode_images(&self, b: &B, images: &[TiledImage]) -> Result<B::Tensor> {
        let _range = crate::nvtx::range("vision");
        let mut states = b.zeros(0, self.config.text_config.hidden_size);
        for image in images {
            states = b.concat_rows(&states, &self.encode_image(b, image)?.1);
        }
        Ok(states)
    }

    /// Every cross-attention layer's K/V of stacked image states.
    pub fn cross_kv(&self, b: &B, states: &B::Tensor) -> Vec<ImageKv<B>> {
        self.language_model.cross_kv(b, states)
    }

    /// A paged KV cache for the self-attention layers.
    pub fn new_kv_cache(&self, b: &B, blocks: usize, block_size: usize) -> PagedKvCache<B> {
        let t = &self.config.text_config;
        PagedKvCache::new(b, t.self_attention_layers().len(), blocks, block_size, t.kv_width())
    }

    /// A media cache with room for `slots` images, one block per cross-attention layer.
    pub fn new_media_cache(&self, b: &B, slots: usize) -> MediaCache<B> {
        let t = &self.config.text_config;
        MediaCache::new(b, t.cross_attention_layers.len(), slots, self.tokens_per_image(), t.kv_width())
    }

    /// Stores a request's images' K/V at `slots` with their views: each image shows its used tiles, and an image
    /// whose `<|image|>` token directly follows the previous one's is seen together with it (the processor's
    /// cross-attention mask).
    pub fn write_media(
        &self,
        b: &B,
        media: &mut MediaCache<B>,
        images: &[TiledImage],
        joins_previous: &[bool],
        slots: &[u32],
    ) -> Result<()> {
        let states = self.encode_images(b, images)?;
        media.write(b, &self.cross_kv(b, &states), slots);
        for (i, image) in images.iter().enumerate() {
            let after = (i > 0 && joins_previous[i]).then(|| slots[i - 1]);
            media.set_view(
                slots[i],
                SlotView {
                    rows: self.visible_tokens(image),
                    after,
                },
            );
        }
        Ok(())
    }
}
