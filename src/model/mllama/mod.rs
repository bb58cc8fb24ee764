//! Llama 3.2 Vision (`MllamaForConditionalGeneration`, transformers' `modeling_mllama.py`), one file per part,
//! names as in transformers: `vision` (the tiled vision tower), `text` (the decoder with its cross-attention
//! layers); `synthetic` makes the 11B model with random weights for benchmarks. Where transformers 5.23 deviates
//! from Meta's reference implementation, the model follows Meta's, as it was trained (see
//! `../shared/fixtures/MLLAMA.md`): vision intermediate features are layer inputs, and rows that see no image pass
//! the cross-attention layers unchanged.

pub mod synthetic;
pub mod text;
pub mod vision;

use crate::backend::{Backend, StepLayout};
use crate::cache::kv_cache::PagedKvCache;
use crate::cache::media_cache::{ImageKv, MediaCache};
use crate::error::Result;
use crate::io::mllama_config::MllamaConfig;
use crate::io::image::PreparedImage;
use crate::io::safetensors::WeightStore;
use crate::model::layers::{Linear, WeightLoader};
use crate::model::Model;
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

    /// One image's vision trace and its projected states `[max_num_tiles * P, hidden]` (the cross-attention
    /// states).
    pub fn encode_image(&self, b: &B, image: &PreparedImage) -> Result<(VisionTrace<B>, B::Tensor)> {
        let trace = self.vision_model.forward(b, image)?;
        let states = self.multi_modal_projector.forward(b, &trace.last_hidden_state);
        Ok((trace, states))
    }

}

impl<B: Backend> Model<B> for Mllama<B> {
    fn context_len(&self) -> usize {
        self.config.text_config.max_position_embeddings
    }

    fn vocab_rows(&self) -> usize {
        self.config.embedding_rows()
    }

    fn head_dim(&self) -> usize {
        self.config.text_config.head_dim()
    }

    /// One layer per self-attention layer, `num_key_value_heads * head_dim` wide.
    fn kv_layout(&self) -> (usize, usize) {
        let t = &self.config.text_config;
        (t.self_attention_layers().len(), t.kv_width())
    }

    fn new_kv_cache(&self, b: &B, blocks: usize, block_size: usize) -> PagedKvCache<B> {
        let (layers, width) = self.kv_layout();
        PagedKvCache::new(b, layers, blocks, block_size, width)
    }

    /// One block per cross-attention layer; a slot holds every tile of an image.
    fn media_layout(&self) -> (usize, usize, usize) {
        let t = &self.config.text_config;
        (t.cross_attention_layers.len(), self.tokens_per_image(), t.kv_width())
    }

    fn new_media_cache(&self, b: &B, slots: usize) -> MediaCache<B> {
        let (blocks, tokens, width) = self.media_layout();
        MediaCache::new(b, blocks, slots, tokens, width)
    }

    /// The cross-attention states of the images, stacked `[images * tokens_per_image, hidden]`.
    fn encode_images(&self, b: &B, images: &[PreparedImage]) -> B::Tensor {
        let _range = crate::nvtx::range("vision");
        let mut states = b.zeros(0, self.config.text_config.hidden_size);
        for image in images {
            let (_, one) = self
                .encode_image(b, image)
                .expect("the preprocessor only makes tile grids the vision config supports (checked at load)");
            states = b.concat_rows(&states, &one);
        }
        states
    }

    /// The tokens of the image's used tiles.
    fn visible_tokens(&self, image: &PreparedImage) -> usize {
        image.num_tiles() * self.config.vision_config.tokens_per_tile()
    }

    /// The cross-attention layers read each row's images from the step's host layout.
    fn replays_decode(&self) -> bool {
        false
    }

    fn cross_kv(&self, b: &B, states: &B::Tensor) -> Vec<ImageKv<B>> {
        self.language_model.cross_kv(b, states)
    }

    fn forward(
        &self,
        b: &B,
        ids: &[u32],
        step: &StepLayout,
        layout: &B::Layout,
        kv: &mut PagedKvCache<B>,
        media: &MediaCache<B>,
        hidden_states: Option<&mut Vec<B::Tensor>>,
    ) -> Result<B::Tensor> {
        self.language_model.forward(b, ids, step, layout, kv, media, hidden_states)
    }

    fn logits(&self, b: &B, h: &B::Tensor) -> B::Tensor {
        self.language_model.logits(b, h)
    }
}
