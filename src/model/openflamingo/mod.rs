//! OpenFlamingo (open_flamingo 2.0.1 `src/`), one file per part, names as in its code and open_clip's: `vision`
//! (open_clip's `VisionTransformer`), `perceiver` (`PerceiverResampler`), `mpt` (the MPT and MosaicGPT decoder
//! block), `gpt_neox` (the GPT-NeoX layer), `cross_attention` (`GatedCrossAttentionBlock`). The model that ties
//! them into the engine comes next (issue 21).

pub mod cross_attention;
pub mod gpt_neox;
pub mod mpt;
pub mod perceiver;
pub mod vision;

use crate::backend::Backend;
use crate::error::Result;
use crate::io::openflamingo_config::OpenClipConfig;
use crate::model::layers::WeightLoader;
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
