//! The models, one folder per family, names mirroring transformers' (or the family's own code): `idefics` (IDEFICS
//! 9B/80B and their instruct models), `mllama` (Llama 3.2 Vision 11B/90B), `openflamingo` (OpenFlamingo 3B/4B/9B).
//! `layers` holds what families share (weight loading, linear, norm and MLP layers, the CLIP ViT), `llama` the LLaMA
//! decoder layer both IDEFICS and Llama 3.2 Vision use, `sampling` the token-choice rules the runtime applies to
//! every family's logits.
//!
//! Everything is computed through the [`Backend`] trait; a model never names a backend. The runtime drives every
//! family through one interface, [`Model`].

pub mod idefics;
pub mod layers;
pub mod llama;
pub mod mllama;
pub mod openflamingo;
pub mod sampling;
pub mod synthetic;

use crate::backend::{Backend, StepLayout};
use crate::cache::kv_cache::PagedKvCache;
use crate::cache::media_cache::{ImageKv, MediaCache, SlotView};
use crate::error::Result;
use crate::io::image::PreparedImage;

/// What the runtime drives of a model family: encoding a request's media once (the cross-attention K/V of its
/// images, kept in the media cache), and decoder steps over a batch's rows (prefill chunks and decode tokens alike,
/// as the step's layout says), then the LM head on the rows it samples.
pub trait Model<B: Backend> {
    /// Positions a sequence may use: the model's context.
    fn context_len(&self) -> usize;

    /// Rows of the token embedding: token ids at or past it are refused.
    fn vocab_rows(&self) -> usize;

    /// Self-attention head dimension (it selects the kernels a recorded decode step uses).
    fn head_dim(&self) -> usize;

    /// Layers of the paged KV cache and the width of one position's K (or V) in each.
    fn kv_layout(&self) -> (usize, usize);

    /// A paged KV cache of `blocks` blocks of `block_size` positions.
    fn new_kv_cache(&self, b: &B, blocks: usize, block_size: usize) -> PagedKvCache<B>;

    /// Cross-attention blocks of the media cache, key rows per image slot, and the width of one row's K (or V).
    fn media_layout(&self) -> (usize, usize, usize);

    /// A media cache with room for `slots` images.
    fn new_media_cache(&self, b: &B, slots: usize) -> MediaCache<B>;

    /// What the cross-attention sees of images (each preprocessed as the family's preprocessor does):
    /// `[images * tokens_per_image, D_vision]`.
    fn encode_images(&self, b: &B, images: &[PreparedImage]) -> B::Tensor;

    /// Key rows of an image's media slot its cross-attention reads (Llama 3.2 Vision: its used tiles').
    fn visible_tokens(&self, image: &PreparedImage) -> usize;

    /// Whether a decode step may be recorded and replayed (CUDA graphs): not when the model reads the step's host
    /// layout (`forward`'s `step`), which a replay does not see.
    fn replays_decode(&self) -> bool {
        true
    }

    /// Every cross-attention block's K/V of image states (one matrix product per block for all of them, whichever
    /// requests they belong to), as [`MediaCache::write`] stores them.
    fn cross_kv(&self, b: &B, states: &B::Tensor) -> Vec<ImageKv<B>>;

    /// One decoder step: `ids` are the rows of the step's sequences in layout order; their K/V go into `kv` at the
    /// slots the layout gives, and they see their images through `media`. `step` is the host form of `layout`
    /// (read only by models that do not replay decode steps). Returns the final-normed hidden states `[T, D]`;
    /// with `hidden_states`, also every layer's as transformers reports them.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        b: &B,
        ids: &[u32],
        step: &StepLayout,
        layout: &B::Layout,
        kv: &mut PagedKvCache<B>,
        media: &MediaCache<B>,
        hidden_states: Option<&mut Vec<B::Tensor>>,
    ) -> Result<B::Tensor>;

    /// The LM head: logits of every row of `h`.
    fn logits(&self, b: &B, h: &B::Tensor) -> B::Tensor;
}

/// Encodes images (of any requests) and stores every cross-attention block's K/V at `slots`, one per image, with
/// what rows seeing each image attend to: its visible tokens, after the previous image's when `joins_previous`.
pub fn store_images<B: Backend>(
    model: &dyn Model<B>,
    b: &B,
    media: &mut MediaCache<B>,
    images: &[PreparedImage],
    joins_previous: &[bool],
    slots: &[u32],
) {
    encode_images_into(model, b, media, images, slots);
    set_image_views(model, media, images, joins_previous, slots);
}

/// Encodes images (of any requests) and stores every cross-attention block's K/V at `slots`, one per image.
pub fn encode_images_into<B: Backend>(
    model: &dyn Model<B>,
    b: &B,
    media: &mut MediaCache<B>,
    images: &[PreparedImage],
    slots: &[u32],
) {
    let states = model.encode_images(b, images);
    media.write(b, &model.cross_kv(b, &states), slots);
}

/// Sets what rows seeing each image (in its slot) attend to: its visible tokens, after the previous image's when
/// `joins_previous`.
pub fn set_image_views<B: Backend>(
    model: &dyn Model<B>,
    media: &mut MediaCache<B>,
    images: &[PreparedImage],
    joins_previous: &[bool],
    slots: &[u32],
) {
    for (i, image) in images.iter().enumerate() {
        let after = (i > 0 && joins_previous[i]).then(|| slots[i - 1]);
        let rows = model.visible_tokens(image);
        media.set_view(slots[i], SlotView { rows, after });
    }
}
