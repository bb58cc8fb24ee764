//! `config.json` (IdeficsConfig with nested `vision_config` / `perceiver_config`) and `preprocessor_config.json`.
//!
//! Hub configs list only what differs from transformers' defaults (idefics-9b's sub-configs are partial), so every
//! field carries the default of `configuration_idefics.py`; `validate` then rejects values the engine cannot honour,
//! naming the field.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The vision encoder's activation (`vision_config.hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact erf GELU (`"gelu"`), what IDEFICS ships.
    Gelu,
    /// tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
    /// `x * sigmoid(1.702 x)` (`"quick_gelu"`, OpenAI CLIP).
    QuickGelu,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "relu" => Activation::Relu,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    #[serde(alias = "hidden_size")]
    pub embed_dim: usize,
    pub image_size: usize,
    pub intermediate_size: usize,
    pub patch_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            embed_dim: 768,
            image_size: 224,
            intermediate_size: 5120,
            patch_size: 14,
            num_hidden_layers: 32,
            num_attention_heads: 16,
            num_channels: 3,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_attention_heads
    }
    /// Patches per side: transformers floors `image_size / patch_size` in both the conv and the position table.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Tokens per image out of the encoder: the patches plus the class token.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
    pub fn activation(&self) -> Activation {
        Activation::parse(&self.hidden_act).expect("validated")
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct PerceiverConfig {
    pub resampler_n_latents: usize,
    pub resampler_depth: usize,
    pub resampler_n_heads: usize,
    pub resampler_head_dim: usize,
    pub qk_layer_norms_perceiver: bool,
}

impl Default for PerceiverConfig {
    fn default() -> Self {
        PerceiverConfig {
            resampler_n_latents: 64,
            resampler_depth: 6,
            resampler_n_heads: 16,
            resampler_head_dim: 96,
            qk_layer_norms_perceiver: false,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

/// llama3 RoPE frequency scaling (`rope_scaling` / `rope_parameters` with `rope_type: "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// How RoPE turns a position into angles: `inv_freq(i)` for pair `i` of the rotating dims of a head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeFrequencies {
    pub theta: f64,
    pub llama3: Option<Llama3Scaling>,
    /// Only the first this many dims of each head rotate, the rest pass through (GPT-NeoX's
    /// `int(head_dim * rotary_pct)`); `None`: the whole head.
    pub rotary_dims: Option<usize>,
}

impl RopeFrequencies {
    pub fn plain(theta: f64) -> Self {
        RopeFrequencies { theta, llama3: None, rotary_dims: None }
    }

    /// The dims of a `head_dim`-wide head that rotate (rotate-half pairs `i` and `i + rotating / 2`).
    pub fn rotating(&self, head_dim: usize) -> usize {
        self.rotary_dims.unwrap_or(head_dim)
    }

    /// `1 / theta^(2i / rotating)`; with llama3 scaling, transformers' `_compute_llama3_parameters`
    /// (modeling_rope_utils.py): long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    pub fn inv_freq(&self, i: usize, rotating: usize) -> f64 {
        let inv = 1.0 / self.theta.powf(2.0 * i as f64 / rotating as f64);
        let Some(s) = self.llama3 else { return inv };
        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        let wavelen = 2.0 * std::f64::consts::PI / inv;
        if wavelen > low_wavelen {
            inv / s.factor
        } else if wavelen < high_wavelen {
            inv
        } else {
            let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                / (s.high_freq_factor - s.low_freq_factor);
            (1.0 - smooth) * inv / s.factor + smooth * inv
        }
    }
}

/// ALiBi (MPT): head `h`'s score for key `j` from the query at position `i` gains `slope(h) * (j - i)`. The
/// slopes are `2^(-bias_max * (k + 1) / n)`, `k = h`, or with `interleave` (transformers' MPT where the head count
/// is not a power of two: `n` is the next one) the odd `k` first, then the even ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Alibi {
    pub n: usize,
    pub bias_max: f64,
    pub interleave: bool,
}

impl Alibi {
    pub fn slope(&self, h: usize) -> f64 {
        let half = self.n / 2;
        let k = match self.interleave {
            true if h < half => 2 * h + 1,
            true => 2 * (h - half),
            false => h,
        };
        2f64.powf(-self.bias_max * (k + 1) as f64 / self.n as f64)
    }
}

/// The cross-attention gates' shape: one scalar per gate, or one value per hidden unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlphaType {
    Float,
    Vector,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct IdeficsConfig {
    pub vocab_size: usize,
    pub additional_vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub hidden_act: String,
    pub alpha_type: String,
    pub rms_norm_eps: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
    pub cross_layer_interval: usize,
    pub qk_layer_norms: bool,
    pub use_resampler: bool,
    pub max_position_embeddings: usize,
    pub rope_parameters: Option<RopeParameters>,
    pub rope_theta: Option<f64>,
    #[serde(alias = "torch_dtype")]
    pub dtype: Option<String>,
    pub vision_config: VisionConfig,
    pub perceiver_config: PerceiverConfig,
    #[serde(skip)]
    pub path: PathBuf,
}

impl Default for IdeficsConfig {
    fn default() -> Self {
        IdeficsConfig {
            vocab_size: 32000,
            additional_vocab_size: 0,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            hidden_act: "silu".into(),
            alpha_type: "float".into(),
            rms_norm_eps: 1e-6,
            pad_token_id: Some(0),
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            tie_word_embeddings: false,
            cross_layer_interval: 1,
            qk_layer_norms: false,
            use_resampler: false,
            max_position_embeddings: 2048,
            rope_parameters: None,
            rope_theta: None,
            dtype: None,
            vision_config: VisionConfig::default(),
            perceiver_config: PerceiverConfig::default(),
            path: PathBuf::new(),
        }
    }
}

/// The vision tower checks every family's config makes: its heads divide its width (`heads` and `width` name the
/// fields as the family spells them), patches fit the image, RGB input.
pub(crate) fn check_vision_tower(
    path: &Path,
    (heads_field, heads): (&str, usize),
    (width_field, width): (&str, usize),
    (patch, image, channels): (usize, usize, usize),
) -> Result<()> {
    let bad = |field: &str, msg: String| Err(Error::config(path, &format!("vision_config.{field}"), msg));
    if width % heads != 0 {
        return bad(heads_field, format!("{heads} does not divide {width_field} {width}"));
    }
    if patch > image {
        return bad("patch_size", format!("{patch} exceeds image_size {image}"));
    }
    if channels != 3 {
        return bad("num_channels", format!("expected 3 (RGB), found {channels}"));
    }
    Ok(())
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    crate::io::files::regular_file(path, crate::io::files::MAX_JSON_BYTES)?;
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_json(&text, path)
}

/// JSON text parsed as `T`; `origin` names it in messages.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(text: &str, origin: &Path) -> Result<T> {
    serde_json::from_str(text).map_err(|source| Error::Json {
        path: origin.to_path_buf(),
        source,
    })
}

/// A model config as read from `config.json`: where it came from (for messages) and the checks of its domain.
pub(crate) trait ModelConfig: serde::de::DeserializeOwned {
    fn set_path(&mut self, path: &Path);
    fn validate(&self) -> Result<()>;

    /// Parsed, placed and checked.
    fn checked(mut self, origin: &Path) -> Result<Self> {
        self.set_path(origin);
        self.validate()?;
        Ok(self)
    }
}

impl ModelConfig for IdeficsConfig {
    fn set_path(&mut self, path: &Path) {
        self.path = path.to_path_buf();
    }

    fn validate(&self) -> Result<()> {
        IdeficsConfig::validate(self)
    }
}

impl IdeficsConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json::<Self>(path)?.checked(path)
    }

    /// A config from JSON text; `origin` names it in messages.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        parse_json::<Self>(text, origin)?.checked(origin)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Embedding rows and LM-head outputs: the base vocabulary plus the decoupled additional tokens.
    pub fn total_vocab(&self) -> usize {
        self.vocab_size + self.additional_vocab_size
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    pub fn alpha(&self) -> AlphaType {
        if self.alpha_type == "vector" {
            AlphaType::Vector
        } else {
            AlphaType::Float
        }
    }

    /// Number of gated cross-attention blocks: one before every `cross_layer_interval`-th decoder layer.
    pub fn num_cross_layers(&self) -> usize {
        self.num_hidden_layers / self.cross_layer_interval
    }

    /// Width of the image tokens the cross-attention sees (the resampler keeps the vision width).
    pub fn image_tokens_per_image(&self) -> usize {
        if self.use_resampler {
            self.perceiver_config.resampler_n_latents
        } else {
            self.vision_config.num_positions()
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::config(&self.path, field, msg));
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("cross_layer_interval", self.cross_layer_interval),
            ("max_position_embeddings", self.max_position_embeddings),
            ("vision_config.embed_dim", self.vision_config.embed_dim),
            ("vision_config.image_size", self.vision_config.image_size),
            ("vision_config.patch_size", self.vision_config.patch_size),
            (
                "vision_config.num_attention_heads",
                self.vision_config.num_attention_heads,
            ),
            (
                "vision_config.intermediate_size",
                self.vision_config.intermediate_size,
            ),
        ];
        for (field, value) in positive {
            if value == 0 {
                return bad(field, "must be positive, found 0".into());
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        if self.head_dim() % 2 != 0 {
            return bad(
                "hidden_size",
                format!("head dim {} must be even for RoPE", self.head_dim()),
            );
        }
        let v = &self.vision_config;
        check_vision_tower(
            &self.path,
            ("num_attention_heads", v.num_attention_heads),
            ("embed_dim", v.embed_dim),
            (v.patch_size, v.image_size, v.num_channels),
        )?;
        if Activation::parse(&v.hidden_act).is_none() {
            return bad(
                "vision_config.hidden_act",
                format!("unsupported activation {:?} (gelu, gelu_new, gelu_pytorch_tanh, quick_gelu, relu)", v.hidden_act),
            );
        }
        if self.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!(
                    "the LLaMA decoder needs \"silu\", found {:?}",
                    self.hidden_act
                ),
            );
        }
        if self.alpha_type != "float" && self.alpha_type != "vector" {
            return bad(
                "alpha_type",
                format!(
                    "expected \"float\" or \"vector\", found {:?}",
                    self.alpha_type
                ),
            );
        }
        // Numbers that reach a square root, a power or a division: in their domain, or every output is NaN.
        let in_domain = [
            ("rms_norm_eps", self.rms_norm_eps),
            (
                "vision_config.layer_norm_eps",
                self.vision_config.layer_norm_eps,
            ),
            ("rope_theta", self.rope_theta()),
        ];
        for (field, value) in in_domain {
            if !(value.is_finite() && value > 0.0) {
                return bad(field, format!("must be a finite number > 0, found {value}"));
            }
        }
        if self.tie_word_embeddings {
            return bad(
                "tie_word_embeddings",
                "IDEFICS checkpoints ship a separate lm_head; true is unsupported".into(),
            );
        }
        if let Some(kind) = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref())
        {
            if kind != "default" {
                return bad(
                    "rope_parameters.rope_type",
                    format!("only \"default\" RoPE is supported, found {kind:?}"),
                );
            }
        }
        let p = &self.perceiver_config;
        if self.use_resampler {
            for (field, value) in [
                (
                    "perceiver_config.resampler_n_latents",
                    p.resampler_n_latents,
                ),
                ("perceiver_config.resampler_depth", p.resampler_depth),
                ("perceiver_config.resampler_n_heads", p.resampler_n_heads),
                ("perceiver_config.resampler_head_dim", p.resampler_head_dim),
            ] {
                if value == 0 {
                    return bad(field, "must be positive, found 0".into());
                }
            }
        }
        Ok(())
    }
}

/// What `preprocessor_config.json` says about images. Both layouts seen on the hub are accepted: the current one
/// (`size: {height, width}`, `do_*` flags) and the 4.3x one (`image_size` only).
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessorConfig {
    pub image_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f32,
}

/// The smallest `image_std` accepted.
const MIN_IMAGE_STD: f32 = 1e-3;

#[derive(Deserialize, Default)]
struct RawPreprocessor {
    image_size: Option<usize>,
    size: Option<RawSize>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    rescale_factor: Option<f32>,
    resample: Option<u32>,
}

#[derive(Deserialize)]
struct RawSize {
    height: usize,
    width: usize,
}

pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

impl PreprocessorConfig {
    /// The IDEFICS defaults (CLIP statistics) at the vision encoder's input size.
    pub fn default_for(vision: &VisionConfig) -> Self {
        PreprocessorConfig {
            image_size: vision.image_size,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            rescale_factor: 1.0 / 255.0,
        }
    }

    pub fn from_file(path: &Path, vision: &VisionConfig) -> Result<Self> {
        let raw: RawPreprocessor = read_json(path)?;
        let bad = |field: &str, msg: String| Err(Error::config(path, field, msg));
        let image_size = match (&raw.size, raw.image_size) {
            (Some(s), _) if s.height != s.width => {
                return bad(
                    "size",
                    format!("IDEFICS images are square; found {}x{}", s.height, s.width),
                )
            }
            (Some(s), _) => s.height,
            (None, Some(n)) => n,
            (None, None) => vision.image_size,
        };
        if image_size != vision.image_size {
            return bad(
                "size",
                format!(
                    "image size {image_size} differs from config.json vision_config.image_size {}",
                    vision.image_size
                ),
            );
        }
        if let Some(r) = raw.resample {
            if r != 3 {
                return bad(
                    "resample",
                    format!("only bicubic (3) is implemented, found {r}"),
                );
            }
        }
        let triple = |field: &str, v: Option<Vec<f32>>, default: [f32; 3]| -> Result<[f32; 3]> {
            match v {
                None => Ok(default),
                Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
                Some(v) => Err(Error::config(
                    path,
                    field,
                    format!("expected 3 values, found {}", v.len()),
                )),
            }
        };
        let image_std = triple("image_std", raw.image_std, CLIP_STD)?;
        // Pixels are divided by the std: one below this makes them overflow (1e-45 does), and no real std is.
        if image_std
            .iter()
            .any(|&s| !(s.is_finite() && s >= MIN_IMAGE_STD))
        {
            return bad(
                "image_std",
                format!("must be finite and at least {MIN_IMAGE_STD}, found {image_std:?}"),
            );
        }
        let rescale_factor = raw.rescale_factor.unwrap_or(1.0 / 255.0);
        if !(rescale_factor.is_finite() && rescale_factor > 0.0) {
            return bad(
                "rescale_factor",
                format!("must be a finite number > 0, found {rescale_factor}"),
            );
        }
        let image_mean = triple("image_mean", raw.image_mean, CLIP_MEAN)?;
        if image_mean.iter().any(|m| !m.is_finite()) {
            return bad(
                "image_mean",
                format!("must be finite, found {image_mean:?}"),
            );
        }
        Ok(PreprocessorConfig {
            image_size,
            image_mean,
            image_std,
            rescale_factor,
        })
    }
}

/// One eos id or a list of them, as configs write either.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The ids `generation_config.json` sets (absent file: none).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
}

impl GenerationConfig {
    pub fn load(path: &Path) -> Result<Self> {
        if path.exists() {
            read_json(path)
        } else {
            Ok(GenerationConfig::default())
        }
    }
}
