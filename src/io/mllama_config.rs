//! Llama 3.2 Vision's `config.json` (`MllamaConfig` with `text_config` and `vision_config`) and its
//! `preprocessor_config.json`. Every field carries the default of transformers' `configuration_mllama.py`, so a
//! partial config reads as transformers reads it; `validate` rejects what the engine cannot honour, naming the field.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::config::{
    check_vision_tower, parse_json, read_json, Llama3Scaling, ModelConfig, RopeFrequencies, TokenIds,
};

/// The `model_type` of a model directory's `config.json`: which family's code loads it.
pub fn model_type(path: &Path) -> Result<String> {
    #[derive(Deserialize)]
    struct Probe {
        model_type: Option<String>,
    }
    let probe: Probe = read_json(path)?;
    Ok(probe.model_type.unwrap_or_else(|| "idefics".into()))
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct MllamaTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub hidden_act: String,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub cross_attention_layers: Vec<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
}

impl Default for MllamaTextConfig {
    fn default() -> Self {
        MllamaTextConfig {
            vocab_size: 128256,
            hidden_size: 4096,
            hidden_act: "silu".into(),
            num_hidden_layers: 40,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            intermediate_size: 14336,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 131072,
            cross_attention_layers: vec![3, 8, 13, 18, 23, 28, 33, 38],
            bos_token_id: Some(128000),
            eos_token_id: Some(TokenIds::One(128001)),
            pad_token_id: Some(128004),
            tie_word_embeddings: false,
        }
    }
}

impl MllamaTextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    /// Positions of the self-attention layers among all decoder layers (the KV cache has one layer per entry).
    pub fn self_attention_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|i| !self.cross_attention_layers.contains(i))
            .collect()
    }

    fn rope(&self) -> Option<&RawRope> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }

    /// The RoPE frequencies: theta from `rope_parameters` or `rope_theta` (transformers' default 500000), llama3
    /// scaling when the config asks for it.
    pub fn rope_frequencies(&self) -> RopeFrequencies {
        let raw = self.rope();
        let theta = raw
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(500000.0);
        let llama3 = raw.filter(|r| r.kind() == Some("llama3")).map(|r| Llama3Scaling {
            factor: r.factor.unwrap_or(8.0),
            low_freq_factor: r.low_freq_factor.unwrap_or(1.0),
            high_freq_factor: r.high_freq_factor.unwrap_or(4.0),
            original_max_position_embeddings: r.original_max_position_embeddings.unwrap_or(8192.0),
        });
        RopeFrequencies { theta, llama3, rotary_dims: None }
    }
}

impl RawRope {
    fn kind(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.legacy_type.as_deref())
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct MllamaVisionConfig {
    pub hidden_size: usize,
    pub hidden_act: String,
    pub num_hidden_layers: usize,
    pub num_global_layers: usize,
    pub attention_heads: usize,
    pub num_channels: usize,
    pub intermediate_size: usize,
    pub vision_output_dim: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub norm_eps: f64,
    pub max_num_tiles: usize,
    pub intermediate_layers_indices: Vec<usize>,
    pub supported_aspect_ratios: Vec<(usize, usize)>,
}

impl Default for MllamaVisionConfig {
    fn default() -> Self {
        MllamaVisionConfig {
            hidden_size: 1280,
            hidden_act: "gelu".into(),
            num_hidden_layers: 32,
            num_global_layers: 8,
            attention_heads: 16,
            num_channels: 3,
            intermediate_size: 5120,
            vision_output_dim: 7680,
            image_size: 448,
            patch_size: 14,
            norm_eps: 1e-5,
            max_num_tiles: 4,
            intermediate_layers_indices: vec![3, 7, 15, 23, 30],
            supported_aspect_ratios: vec![
                (1, 1),
                (1, 2),
                (1, 3),
                (1, 4),
                (2, 1),
                (2, 2),
                (3, 1),
                (4, 1),
            ],
        }
    }
}

impl MllamaVisionConfig {
    /// Patch tokens per tile plus the class token.
    pub fn tokens_per_tile(&self) -> usize {
        let grid = self.image_size / self.patch_size;
        grid * grid + 1
    }

    /// Tokens per tile padded to a multiple of 8, as the encoder runs them.
    pub fn padded_tokens_per_tile(&self) -> usize {
        self.tokens_per_tile().div_ceil(8) * 8
    }

    /// `aspect_ratio_id` of a canvas of `tiles` (rows, columns): 1 + its index among the supported ratios.
    pub fn aspect_ratio_id(&self, tiles: (usize, usize)) -> Option<usize> {
        self.supported_aspect_ratios
            .iter()
            .position(|&r| r == tiles)
            .map(|i| i + 1)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct MllamaConfig {
    pub image_token_index: u32,
    pub text_config: MllamaTextConfig,
    pub vision_config: MllamaVisionConfig,
    #[serde(skip)]
    pub path: PathBuf,
}

impl Default for MllamaConfig {
    fn default() -> Self {
        MllamaConfig {
            image_token_index: 128256,
            text_config: MllamaTextConfig::default(),
            vision_config: MllamaVisionConfig::default(),
            path: PathBuf::new(),
        }
    }
}

impl ModelConfig for MllamaConfig {
    fn set_path(&mut self, path: &Path) {
        self.path = path.to_path_buf();
    }

    fn validate(&self) -> Result<()> {
        MllamaConfig::validate(self)
    }
}

impl MllamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json::<Self>(path)?.checked(path)
    }

    /// A config from JSON text; `origin` names it in messages.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        parse_json::<Self>(text, origin)?.checked(origin)
    }

    /// Rows of the token embedding: the vocabulary plus 8 (the `<|image|>` token and 7 unused rows).
    pub fn embedding_rows(&self) -> usize {
        self.text_config.vocab_size + 8
    }

    fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::config(&self.path, field, msg));
        let (t, v) = (&self.text_config, &self.vision_config);
        let positive = [
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.max_position_embeddings", t.max_position_embeddings),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.attention_heads", v.attention_heads),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.max_num_tiles", v.max_num_tiles),
            ("vision_config.vision_output_dim", v.vision_output_dim),
        ];
        for (field, value) in positive {
            if value == 0 {
                return bad(field, "must be positive, found 0".into());
            }
        }
        if t.hidden_size % t.num_attention_heads != 0 || t.head_dim() % 2 != 0 {
            return bad(
                "text_config.num_attention_heads",
                format!(
                    "{} heads must divide hidden_size {} into an even head dim",
                    t.num_attention_heads, t.hidden_size
                ),
            );
        }
        if t.num_attention_heads % t.num_key_value_heads != 0 {
            return bad(
                "text_config.num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    t.num_key_value_heads, t.num_attention_heads
                ),
            );
        }
        if let Some(&i) = t.cross_attention_layers.iter().find(|&&i| i >= t.num_hidden_layers) {
            return bad(
                "text_config.cross_attention_layers",
                format!(
                    "layer {i} is out of range: the decoder has {} layers (0 .. {})",
                    t.num_hidden_layers,
                    t.num_hidden_layers - 1
                ),
            );
        }
        if t.hidden_act != "silu" {
            return bad(
                "text_config.hidden_act",
                format!("the Llama decoder needs \"silu\", found {:?}", t.hidden_act),
            );
        }
        if !(t.rms_norm_eps.is_finite() && t.rms_norm_eps > 0.0) {
            return bad(
                "text_config.rms_norm_eps",
                format!("must be a positive number, found {}", t.rms_norm_eps),
            );
        }
        if let Some(r) = t.rope() {
            match r.kind() {
                None | Some("default") | Some("llama3") => {}
                Some(other) => {
                    return bad(
                        "text_config.rope_scaling",
                        format!("rope_type {other:?} is not supported (default, llama3)"),
                    )
                }
            }
        }
        let rope = t.rope_frequencies();
        if !(rope.theta.is_finite() && rope.theta > 1.0) {
            return bad(
                "text_config.rope_theta",
                format!("must be a number above 1, found {}", rope.theta),
            );
        }
        if let Some(s) = rope.llama3 {
            let ok = [s.factor, s.low_freq_factor, s.original_max_position_embeddings]
                .iter()
                .all(|x| x.is_finite() && *x > 0.0)
                && s.high_freq_factor.is_finite()
                && s.high_freq_factor > s.low_freq_factor;
            if !ok {
                return bad(
                    "text_config.rope_scaling",
                    format!("llama3 scaling needs positive factors with high_freq_factor > low_freq_factor, found {s:?}"),
                );
            }
        }
        check_vision_tower(
            &self.path,
            ("attention_heads", v.attention_heads),
            ("hidden_size", v.hidden_size),
            (v.patch_size, v.image_size, v.num_channels),
        )?;
        if v.hidden_act != "gelu" {
            return bad(
                "vision_config.hidden_act",
                format!("the Mllama vision encoder uses \"gelu\", found {:?}", v.hidden_act),
            );
        }
        if !(v.norm_eps.is_finite() && v.norm_eps > 0.0) {
            return bad(
                "vision_config.norm_eps",
                format!("must be a positive number, found {}", v.norm_eps),
            );
        }
        if let Some(&i) = v
            .intermediate_layers_indices
            .iter()
            .find(|&&i| i >= v.num_hidden_layers)
        {
            return bad(
                "vision_config.intermediate_layers_indices",
                format!(
                    "layer {i} is out of range: the local encoder has {} layers",
                    v.num_hidden_layers
                ),
            );
        }
        let width = v.hidden_size * (1 + v.intermediate_layers_indices.len());
        if v.vision_output_dim != width {
            return bad(
                "vision_config.vision_output_dim",
                format!(
                    "{} but hidden_size x (1 + intermediate layers) = {width}",
                    v.vision_output_dim
                ),
            );
        }
        if let Some(&(h, w)) = v
            .supported_aspect_ratios
            .iter()
            .find(|&&(h, w)| h == 0 || w == 0 || h * w > v.max_num_tiles)
        {
            return bad(
                "vision_config.supported_aspect_ratios",
                format!("{h}x{w} tiles is empty or over max_num_tiles {}", v.max_num_tiles),
            );
        }
        if (self.image_token_index as usize) < t.vocab_size
            || self.image_token_index as usize >= self.embedding_rows()
        {
            return bad(
                "image_token_index",
                format!(
                    "{} must be one of the 8 embedding rows past vocab_size {}",
                    self.image_token_index, t.vocab_size
                ),
            );
        }
        Ok(())
    }
}

/// Tile grids with at most `max_tiles` tiles, in transformers' order (`get_all_supported_aspect_ratios`).
pub fn tile_grids(max_tiles: usize) -> Vec<(usize, usize)> {
    (1..=max_tiles)
        .flat_map(|h| (1..=max_tiles).map(move |w| (h, w)))
        .filter(|&(h, w)| h * w <= max_tiles)
        .collect()
}

/// `preprocessor_config.json` of `MllamaImageProcessor`: tile size, tile budget, rescale and CLIP normalisation.
#[derive(Clone, Debug)]
pub struct MllamaPreprocessorConfig {
    /// Side of a square tile in pixels (`size.height` = `size.width`).
    pub tile_size: usize,
    pub max_image_tiles: usize,
    pub rescale_factor: f64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

#[derive(Deserialize)]
#[serde(default)]
struct RawMllamaPreprocessor {
    size: RawSize,
    max_image_tiles: usize,
    rescale_factor: f64,
    image_mean: Vec<f32>,
    image_std: Vec<f32>,
    resample: u32,
}

#[derive(Deserialize)]
struct RawSize {
    height: usize,
    width: usize,
}

impl RawMllamaPreprocessor {
    fn for_vision(vision: &MllamaVisionConfig) -> Self {
        RawMllamaPreprocessor {
            size: RawSize {
                height: vision.image_size,
                width: vision.image_size,
            },
            max_image_tiles: vision.max_num_tiles,
            ..Default::default()
        }
    }
}

impl Default for RawMllamaPreprocessor {
    fn default() -> Self {
        RawMllamaPreprocessor {
            size: RawSize {
                height: 560,
                width: 560,
            },
            max_image_tiles: 4,
            rescale_factor: 1.0 / 255.0,
            image_mean: vec![0.48145466, 0.4578275, 0.40821073],
            image_std: vec![0.26862954, 0.26130258, 0.27577711],
            resample: 2,
        }
    }
}

impl MllamaPreprocessorConfig {
    /// Reads `path`, or transformers' defaults for the vision config's tile size when it does not exist.
    pub fn load(path: &Path, vision: &MllamaVisionConfig) -> Result<Self> {
        if !path.exists() {
            return Self::checked(RawMllamaPreprocessor::for_vision(vision), path, vision);
        }
        Self::checked(read_json(path)?, path, vision)
    }

    /// transformers' defaults at the vision config's tile size and tile count.
    pub fn default_for(vision: &MllamaVisionConfig) -> Result<Self> {
        let origin = Path::new("<default preprocessor_config.json>");
        Self::checked(RawMllamaPreprocessor::for_vision(vision), origin, vision)
    }

    fn checked(raw: RawMllamaPreprocessor, path: &Path, vision: &MllamaVisionConfig) -> Result<Self> {
        let bad = |field: &str, msg: String| Err(Error::config(path, field, msg));
        if raw.size.height != raw.size.width || raw.size.height != vision.image_size {
            return bad(
                "size",
                format!(
                    "tiles must be square and match vision_config.image_size {}, found {}x{}",
                    vision.image_size, raw.size.height, raw.size.width
                ),
            );
        }
        // The vision tower runs max_num_tiles tiles per image: the processor packs to as many.
        if raw.max_image_tiles != vision.max_num_tiles {
            return bad(
                "max_image_tiles",
                format!(
                    "must equal vision_config.max_num_tiles {}, found {}",
                    vision.max_num_tiles, raw.max_image_tiles
                ),
            );
        }
        if let Some((h, w)) = tile_grids(raw.max_image_tiles)
            .into_iter()
            .find(|g| !vision.supported_aspect_ratios.contains(g))
        {
            return bad(
                "max_image_tiles",
                format!(
                    "the processor may tile an image {h}x{w}, which vision_config.supported_aspect_ratios {:?} lacks",
                    vision.supported_aspect_ratios
                ),
            );
        }
        if raw.resample != 2 {
            return bad(
                "resample",
                format!("only 2 (bilinear, what Llama 3.2 Vision ships) is supported, found {}", raw.resample),
            );
        }
        if !(raw.rescale_factor.is_finite() && raw.rescale_factor > 0.0) {
            return bad("rescale_factor", format!("must be positive, found {}", raw.rescale_factor));
        }
        let three = |field: &str, v: &[f32]| -> Result<[f32; 3]> {
            <[f32; 3]>::try_from(v)
                .ok()
                .filter(|a| a.iter().all(|x| x.is_finite()))
                .ok_or_else(|| Error::config(path, field, format!("expected 3 finite values, found {v:?}")))
        };
        let image_std = three("image_std", &raw.image_std)?;
        if image_std.iter().any(|&s| s < 1e-3) {
            return bad("image_std", format!("every value must be at least 1e-3, found {image_std:?}"));
        }
        Ok(MllamaPreprocessorConfig {
            tile_size: raw.size.height,
            max_image_tiles: raw.max_image_tiles,
            rescale_factor: raw.rescale_factor,
            image_mean: three("image_mean", &raw.image_mean)?,
            image_std,
        })
    }
}
