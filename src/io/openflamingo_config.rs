//! OpenFlamingo's configs as its three parts ship them: the folder holding `checkpoint.pt` (the trained perceiver,
//! gated cross-attention blocks and resized input embeddings), the language model's Hugging Face directory
//! (`config.json`, `pytorch_model.bin` or shards, the tokenizer with OpenFlamingo's added tokens) and open_clip's
//! vision tower (its model config JSON beside `open_clip_pytorch_model.bin`).
//!
//! OpenFlamingo stores none of its own sizes: the resampler and cross-attention sizes are fixed in its code, and
//! `cross_attn_every_n_layers` is an argument of `create_model_and_transforms`; the checkpoint's tensor names say
//! which decoder layers have a gated block, and their shapes say the rest.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::config::{read_json, Alibi};
use crate::io::safetensors::WeightStore;

/// Where OpenFlamingo's three parts are.
#[derive(Clone, Debug)]
pub struct OpenFlamingoParts {
    pub weights: PartWeights,
    /// The language model's Hugging Face directory (its config and tokenizer; its weights too as released).
    pub lang_dir: PathBuf,
    /// open_clip's model config (`<name>.json`, or the hub's `open_clip_config.json`).
    pub vision_config: PathBuf,
}

/// Where the weights are.
#[derive(Clone, Debug)]
pub enum PartWeights {
    /// As released: `checkpoint.pt` over the language model's weights and open_clip's.
    Released { checkpoint: PathBuf, vision_weights: PathBuf },
    /// As `flamingo convert` writes them: one `model.safetensors` in this folder, under OpenFlamingo's names.
    Converted(PathBuf),
}

/// The `model_type` of the `config.json` that `flamingo convert` writes.
pub const CONVERTED_MODEL_TYPE: &str = "openflamingo";

/// The `config.json` of a converted OpenFlamingo folder: where its parts' configs are, relative to it.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConvertedLayout {
    pub model_type: String,
    /// The language model's config and tokenizer files (with OpenFlamingo's tokens added).
    pub lang_model: PathBuf,
    /// open_clip's model config.
    pub vision_config: PathBuf,
}

/// The subfolders of a converted folder.
pub const CONVERTED_LANG: &str = "lang_model";
pub const CONVERTED_VISION: &str = "vision_model";

/// The file name of open_clip's weights, as the hub and `open_clip.create_model_and_transforms` save them.
pub const OPEN_CLIP_WEIGHTS: &str = "open_clip_pytorch_model.bin";

impl OpenFlamingoParts {
    /// The parts of the OpenFlamingo folder `dir`: `lang` (the language model's directory) and `vision` (open_clip's
    /// weights file, or the folder holding it) where given, else its one subfolder with a `config.json` and its one
    /// subfolder with an `open_clip_pytorch_model.bin`.
    pub fn locate(dir: &Path, lang: Option<&Path>, vision: Option<&Path>) -> Result<Self> {
        let checkpoint = dir.join("checkpoint.pt");
        if !checkpoint.is_file() {
            return Err(not_found(&checkpoint, "no checkpoint.pt in the OpenFlamingo model directory"));
        }
        let lang_dir = match lang {
            Some(p) => p.to_path_buf(),
            None => only_subfolder(dir, "config.json", "--lang-model")?,
        };
        if !lang_dir.join("config.json").is_file() {
            return Err(not_found(&lang_dir.join("config.json"), "the language model directory has no config.json"));
        }
        let vision_weights = match vision {
            Some(p) if p.is_dir() => p.join(OPEN_CLIP_WEIGHTS),
            Some(p) => p.to_path_buf(),
            None => only_subfolder(dir, OPEN_CLIP_WEIGHTS, "--vision-model")?.join(OPEN_CLIP_WEIGHTS),
        };
        if !vision_weights.is_file() {
            return Err(not_found(&vision_weights, "open_clip's weights are not there"));
        }
        let vision_config = open_clip_config_beside(&vision_weights)?;
        Ok(OpenFlamingoParts {
            weights: PartWeights::Released { checkpoint, vision_weights },
            lang_dir,
            vision_config,
        })
    }

    /// The parts of a folder `flamingo convert` wrote, as its `config.json` (`layout`, read from `config`) says.
    pub fn converted(dir: &Path, config: &Path) -> Result<Self> {
        let layout: ConvertedLayout = read_json(config)?;
        let inside = |field: &str, rel: &Path| {
            if rel.is_absolute() || rel.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(Error::config(config, field, format!("{} is not a path inside the folder", rel.display())));
            }
            Ok(dir.join(rel))
        };
        Ok(OpenFlamingoParts {
            weights: PartWeights::Converted(dir.to_path_buf()),
            lang_dir: inside("lang_model", &layout.lang_model)?,
            vision_config: inside("vision_config", &layout.vision_config)?,
        })
    }
}

impl OpenFlamingoParts {
    /// Every tensor of the three parts under the names of OpenFlamingo's own state dict: the language model's as
    /// `lang_encoder.*`, open_clip's vision tower's as `vision_encoder.*` (its text tower dropped), and the
    /// checkpoint's as they are, replacing the language model's where both have one (the trained, resized input
    /// embeddings), as `load_state_dict(strict=False)` does.
    pub fn open_store(&self) -> Result<WeightStore> {
        let (checkpoint, vision_weights) = match &self.weights {
            PartWeights::Converted(dir) => return WeightStore::open_dir(dir),
            PartWeights::Released { checkpoint, vision_weights } => (checkpoint, vision_weights),
        };
        let lang = WeightStore::open_dir(&self.lang_dir)?;
        let vision = WeightStore::open_files(&[vision_weights.clone()], vision_weights.display().to_string())?;
        let checkpoint_store = WeightStore::open_files(&[checkpoint.clone()], checkpoint.display().to_string())?;
        let description = format!(
            "{} over {} and {}",
            checkpoint.display(),
            self.lang_dir.display(),
            vision_weights.display()
        );
        Ok(WeightStore::merged(
            vec![(lang, "", "lang_encoder."), (vision, "visual.", "vision_encoder."), (checkpoint_store, "", "")],
            description,
        ))
    }
}

/// An OpenFlamingo model's parts and their configs, read and checked before any weight is touched.
#[derive(Clone, Debug)]
pub struct OpenFlamingoConfig {
    pub parts: OpenFlamingoParts,
    pub vision: OpenClipConfig,
    pub decoder: DecoderConfig,
}

impl OpenFlamingoConfig {
    /// Whether `dir` is an OpenFlamingo folder: a `checkpoint.pt` and no Hugging Face `config.json` of its own.
    pub fn is_openflamingo_dir(dir: &Path) -> bool {
        dir.join("checkpoint.pt").is_file() && !dir.join("config.json").exists()
    }

    /// The parts of `dir` ([`OpenFlamingoParts::locate`]) and their configs.
    pub fn open(dir: &Path, lang: Option<&Path>, vision: Option<&Path>) -> Result<Self> {
        Self::of_parts(OpenFlamingoParts::locate(dir, lang, vision)?)
    }

    /// The configs of `parts`.
    pub fn of_parts(parts: OpenFlamingoParts) -> Result<Self> {
        Ok(OpenFlamingoConfig {
            vision: OpenClipConfig::from_file(&parts.vision_config)?,
            decoder: DecoderConfig::from_file(&parts.lang_config())?,
            parts,
        })
    }

    /// Whether the language model's tokenizer files declare a pad token (`special_tokens_map.json` or
    /// `tokenizer_config.json`): OpenFlamingo adds `<PAD>` only when they do not.
    pub fn declares_pad_token(&self) -> Result<bool> {
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = self.parts.lang_dir.join(name);
            if path.is_file() {
                let value: serde_json::Value = read_json(&path)?;
                if !value.get("pad_token").unwrap_or(&serde_json::Value::Null).is_null() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

impl OpenFlamingoParts {
    /// The language model's `config.json`.
    pub fn lang_config(&self) -> PathBuf {
        self.lang_dir.join("config.json")
    }
}

impl DecoderConfig {
    /// The `config.json` it was read from.
    pub fn path(&self) -> &Path {
        match self {
            DecoderConfig::Mpt(c) => &c.path,
            DecoderConfig::GptNeox(c) => &c.path,
        }
    }

    /// The decoder's context: positions a sequence may use.
    pub fn context_len(&self) -> usize {
        match self {
            DecoderConfig::Mpt(c) => c.max_seq_len,
            DecoderConfig::GptNeox(c) => c.max_position_embeddings,
        }
    }
}

fn not_found(path: &Path, message: &str) -> Error {
    Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, message.to_string()))
}

/// The one subfolder of `dir` holding `file`; none or several is an error that names `option`.
fn only_subfolder(dir: &Path, file: &str, option: &str) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(file).is_file())
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(not_found(dir, &format!("no subfolder holds {file}: give it with {option}"))),
        _ => Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} subfolders hold {file}: choose one with {option}", found.len()),
            ),
        )),
    }
}

/// open_clip's model config beside its weights: the hub's `open_clip_config.json`, else the one `*.json` there.
fn open_clip_config_beside(weights: &Path) -> Result<PathBuf> {
    let dir = weights.parent().unwrap_or(Path::new("."));
    let hub = dir.join("open_clip_config.json");
    if hub.is_file() {
        return Ok(hub);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut jsons: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
        .collect();
    jsons.sort();
    match jsons.len() {
        1 => Ok(jsons.remove(0)),
        n => Err(not_found(
            dir,
            &format!(
                "expected open_clip's model config (open_clip_config.json, or one <model name>.json) beside {}, \
                 found {n} JSON files",
                weights.display()
            ),
        )),
    }
}

/// open_clip's `vision_cfg` (`open_clip/model.py` `CLIPVisionCfg`), with its defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct OpenClipVisionConfig {
    pub image_size: usize,
    pub layers: usize,
    pub width: usize,
    pub head_width: usize,
    pub patch_size: usize,
    pub mlp_ratio: f64,
    /// Options of open_clip's other towers, refused: the OpenFlamingo models use none of them.
    ls_init_value: Option<f64>,
    timm_model_name: Option<String>,
    attentional_pool: bool,
    no_ln_pre: bool,
    final_ln_after_pool: bool,
}

impl Default for OpenClipVisionConfig {
    fn default() -> Self {
        OpenClipVisionConfig {
            image_size: 224,
            layers: 12,
            width: 768,
            head_width: 64,
            patch_size: 16,
            mlp_ratio: 4.0,
            ls_init_value: None,
            timm_model_name: None,
            attentional_pool: false,
            no_ln_pre: false,
            final_ln_after_pool: false,
        }
    }
}

impl OpenClipVisionConfig {
    pub fn heads(&self) -> usize {
        self.width / self.head_width
    }

    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens the resampler reads of an image: one per patch (the class token is dropped).
    pub fn patch_tokens(&self) -> usize {
        self.grid() * self.grid()
    }

    pub fn mlp_width(&self) -> usize {
        (self.width as f64 * self.mlp_ratio) as usize
    }
}

/// open_clip's model config: `<name>.json` as `open_clip.add_model_config` reads it, or the hub's
/// `open_clip_config.json`, which holds the same under `model_cfg`.
#[derive(Clone, Debug)]
pub struct OpenClipConfig {
    pub path: PathBuf,
    pub quick_gelu: bool,
    pub vision: OpenClipVisionConfig,
}

#[derive(Deserialize)]
struct RawOpenClip {
    model_cfg: Option<Box<RawOpenClip>>,
    #[serde(default)]
    quick_gelu: bool,
    vision_cfg: Option<OpenClipVisionConfig>,
}

impl OpenClipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut raw: RawOpenClip = read_json(path)?;
        if let Some(inner) = raw.model_cfg.take() {
            raw = *inner;
        }
        let vision = raw
            .vision_cfg
            .ok_or_else(|| Error::config(path, "vision_cfg", "missing: an open_clip model config has one"))?;
        let config = OpenClipConfig {
            path: path.to_path_buf(),
            quick_gelu: raw.quick_gelu,
            vision,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let v = &self.vision;
        let bad = |field: &str, msg: String| Err(Error::config(&self.path, &format!("vision_cfg.{field}"), msg));
        for (field, value) in [("layers", v.layers), ("width", v.width), ("head_width", v.head_width), ("patch_size", v.patch_size)] {
            if value == 0 {
                return bad(field, "must be positive".into());
            }
        }
        if v.timm_model_name.is_some() {
            return bad("timm_model_name", "timm vision towers are not supported (OpenFlamingo uses open_clip's ViT)".into());
        }
        let unsupported = [
            ("ls_init_value", v.ls_init_value.is_some()),
            ("attentional_pool", v.attentional_pool),
            ("no_ln_pre", v.no_ln_pre),
            ("final_ln_after_pool", v.final_ln_after_pool),
        ];
        if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
            return bad(field, "not supported: OpenFlamingo's ViT-L/14 does not use it".into());
        }
        if !(v.mlp_ratio > 0.0) || (v.width as f64 * v.mlp_ratio).fract() != 0.0 {
            return bad("mlp_ratio", format!("{} times width {} is not a whole width", v.mlp_ratio, v.width));
        }
        if v.width % v.head_width != 0 {
            return bad("head_width", format!("{} does not divide width {}", v.head_width, v.width));
        }
        if v.patch_size > v.image_size {
            return bad("patch_size", format!("{} exceeds image_size {}", v.patch_size, v.image_size));
        }
        Ok(())
    }
}

/// The language model OpenFlamingo wraps, from its directory's `config.json` (`model_type`): MPT as transformers
/// reads it (`mpt`, OpenFlamingo-9B's MPT-7B), MosaicGPT as the hub code of mpt-1b-redpajama-200b reads it
/// (`mosaic_gpt`, OpenFlamingo-3B), or GPT-NeoX (`gpt_neox`, OpenFlamingo-4B's RedPajama-INCITE-3B).
#[derive(Clone, Debug)]
pub enum DecoderConfig {
    Mpt(MptConfig),
    GptNeox(GptNeoxConfig),
}

/// Which code's names and rules an MPT checkpoint follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MptFlavour {
    /// transformers' `MptForCausalLM`: `norm_1`, `ffn.up_proj`, `norm_f`; no biases at all (its LayerNorms' biases
    /// are removed whatever `no_bias` says); the ALiBi slopes of the next power of two of heads, interleaved.
    Transformers,
    /// MosaicGPT: `ln_1`, `mlp.mlp_up`, `ln_f`, optional q/k LayerNorm over all of `d_model`; `no_bias` strips the
    /// linears' and the LayerNorms' biases; slopes `2^(-8h/H)`, not interleaved.
    MosaicGpt,
}

/// An MPT decoder (ALiBi, no position embeddings, tied embeddings).
#[derive(Clone, Debug)]
pub struct MptConfig {
    pub path: PathBuf,
    pub flavour: MptFlavour,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    pub max_seq_len: usize,
    pub vocab_size: usize,
    /// The feed-forward's hidden width: transformers' MPT always takes 4 x d_model; MosaicGPT `mlp_ratio` x.
    pub mlp_width: usize,
    pub alibi_bias_max: f64,
    /// MosaicGPT's `attn_qk_ln`.
    pub qk_ln: bool,
    /// Whether linears and LayerNorms have biases (MosaicGPT with `no_bias: false`).
    pub biases: bool,
    pub layer_norm_eps: f64,
}

impl MptConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// The heads' ALiBi slopes as its code computes them.
    pub fn alibi(&self) -> Alibi {
        let h = self.n_heads;
        match self.flavour {
            MptFlavour::MosaicGpt => Alibi { n: h, bias_max: self.alibi_bias_max, interleave: false },
            MptFlavour::Transformers => {
                let n = h.next_power_of_two();
                Alibi { n, bias_max: self.alibi_bias_max, interleave: n != h }
            }
        }
    }
}

/// A GPT-NeoX decoder (rotary on the first `rotary_ndims` of each head, biases, untied `embed_out`).
#[derive(Clone, Debug)]
pub struct GptNeoxConfig {
    pub path: PathBuf,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    /// `int(head_dim * rotary_pct)`, as transformers computes it.
    pub rotary_ndims: usize,
    pub rotary_emb_base: f64,
    pub layer_norm_eps: f64,
    pub use_parallel_residual: bool,
}

impl GptNeoxConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Deserialize)]
struct RawMptAttn {
    #[serde(default = "yes")]
    alibi: bool,
    #[serde(default = "eight")]
    alibi_bias_max: f64,
    #[serde(default)]
    qk_ln: bool,
    clip_qkv: Option<f64>,
    softmax_scale: Option<f64>,
    #[serde(default)]
    prefix_lm: bool,
    #[serde(default)]
    attn_uses_sequence_id: bool,
    attn_type: Option<String>,
}

fn yes() -> bool {
    true
}

fn eight() -> f64 {
    8.0
}

/// The fields of transformers' `MptConfig` and of MosaicGPT's config (flat `attn_*` and `alibi*` fields) the
/// engine reads; the rest (initialisation, dropout, the attention implementation) do not change the computation.
#[derive(Deserialize)]
struct RawMpt {
    d_model: usize,
    n_heads: usize,
    n_layers: usize,
    max_seq_len: usize,
    vocab_size: usize,
    #[serde(default)]
    no_bias: bool,
    mlp_ratio: Option<usize>,
    #[serde(default = "eps")]
    layer_norm_epsilon: f64,
    attn_config: Option<RawMptAttn>,
    // MosaicGPT's flat spellings.
    alibi: Option<bool>,
    alibi_bias_max: Option<f64>,
    attn_qk_ln: Option<bool>,
    attn_clip_qkv: Option<f64>,
    softmax_scale: Option<f64>,
    prefix_lm: Option<bool>,
    attn_uses_sequence_id: Option<bool>,
}

fn eps() -> f64 {
    1e-5
}

#[derive(Deserialize)]
struct RawNeox {
    hidden_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default = "quarter")]
    rotary_pct: f64,
    #[serde(default = "ten_thousand")]
    rotary_emb_base: f64,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
    #[serde(default = "yes")]
    use_parallel_residual: bool,
    #[serde(default = "gelu")]
    hidden_act: String,
    rope_scaling: Option<serde_json::Value>,
}

fn quarter() -> f64 {
    0.25
}

fn ten_thousand() -> f64 {
    10_000.0
}

fn gelu() -> String {
    "gelu".into()
}

impl DecoderConfig {
    /// Reads `config.json` of the language model's directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Probe {
            model_type: Option<String>,
        }
        let value: serde_json::Value = read_json(path)?;
        let probe: Probe = typed(value.clone(), path)?;
        match probe.model_type.as_deref() {
            Some("mpt") => mpt(typed(value, path)?, path, MptFlavour::Transformers).map(DecoderConfig::Mpt),
            Some("mosaic_gpt") => mpt(typed(value, path)?, path, MptFlavour::MosaicGpt).map(DecoderConfig::Mpt),
            Some("gpt_neox") => neox(typed(value, path)?, path).map(DecoderConfig::GptNeox),
            other => Err(Error::config(
                path,
                "model_type",
                format!("{other:?} is not a language model OpenFlamingo ships with (mpt, mosaic_gpt, gpt_neox)"),
            )),
        }
    }
}

/// A config read once as JSON, taken as `T`.
fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value, path: &Path) -> Result<T> {
    serde_json::from_value(value).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

fn mpt(raw: RawMpt, path: &Path, flavour: MptFlavour) -> Result<MptConfig> {
    let bad = |field: &str, msg: String| Err(Error::config(path, field, msg));
    let attn = raw.attn_config.as_ref();
    let (alibi, alibi_bias_max, qk_ln, clip_qkv, softmax_scale, prefix_lm, sequence_id) = match flavour {
        MptFlavour::Transformers => match attn {
            Some(a) => (a.alibi, a.alibi_bias_max, a.qk_ln, a.clip_qkv, a.softmax_scale, a.prefix_lm, a.attn_uses_sequence_id),
            None => (true, 8.0, false, None, None, false, false),
        },
        MptFlavour::MosaicGpt => (
            raw.alibi.unwrap_or(false),
            raw.alibi_bias_max.unwrap_or(8.0),
            raw.attn_qk_ln.unwrap_or(false),
            raw.attn_clip_qkv,
            raw.softmax_scale,
            raw.prefix_lm.unwrap_or(false),
            raw.attn_uses_sequence_id.unwrap_or(false),
        ),
    };
    let field = |transformers: &str, mosaic: &str| match flavour {
        MptFlavour::Transformers => format!("attn_config.{transformers}"),
        MptFlavour::MosaicGpt => mosaic.to_string(),
    };
    if !alibi {
        return bad(&field("alibi", "alibi"), "false: learned position embeddings are not supported (OpenFlamingo's MPTs use ALiBi)".into());
    }
    if softmax_scale.is_some() {
        return bad(&field("softmax_scale", "softmax_scale"), "set: only the default 1/sqrt(head_dim) is supported".into());
    }
    if clip_qkv.is_some() {
        return bad(&field("clip_qkv", "attn_clip_qkv"), "set: clipping q/k/v is not supported".into());
    }
    if prefix_lm || sequence_id {
        let name = if prefix_lm { field("prefix_lm", "prefix_lm") } else { field("attn_uses_sequence_id", "attn_uses_sequence_id") };
        return bad(&name, "true: only causal attention over one sequence is supported".into());
    }
    if let Some(kind) = attn.and_then(|a| a.attn_type.as_deref()).filter(|&k| k != "multihead_attention") {
        return bad("attn_config.attn_type", format!("{kind:?}: only multihead_attention is supported"));
    }
    if flavour == MptFlavour::Transformers && qk_ln {
        return bad("attn_config.qk_ln", "true: transformers' MPT ignores it while MPT's hub code applies it; convert the checkpoint to say which".into());
    }
    for (name, v) in [("d_model", raw.d_model), ("n_heads", raw.n_heads), ("n_layers", raw.n_layers), ("max_seq_len", raw.max_seq_len), ("vocab_size", raw.vocab_size)] {
        if v == 0 {
            return bad(name, "must be positive".into());
        }
    }
    if raw.d_model % raw.n_heads != 0 {
        return bad("n_heads", format!("{} does not divide d_model {}", raw.n_heads, raw.d_model));
    }
    let mlp_width = match flavour {
        MptFlavour::Transformers => 4 * raw.d_model,
        MptFlavour::MosaicGpt => raw.mlp_ratio.unwrap_or(4) * raw.d_model,
    };
    Ok(MptConfig {
        path: path.to_path_buf(),
        flavour,
        d_model: raw.d_model,
        n_heads: raw.n_heads,
        n_layers: raw.n_layers,
        max_seq_len: raw.max_seq_len,
        vocab_size: raw.vocab_size,
        mlp_width,
        alibi_bias_max,
        qk_ln,
        biases: flavour == MptFlavour::MosaicGpt && !raw.no_bias,
        layer_norm_eps: raw.layer_norm_epsilon,
    })
}

fn neox(raw: RawNeox, path: &Path) -> Result<GptNeoxConfig> {
    let bad = |field: &str, msg: String| Err(Error::config(path, field, msg));
    for (name, v) in [
        ("hidden_size", raw.hidden_size),
        ("num_attention_heads", raw.num_attention_heads),
        ("num_hidden_layers", raw.num_hidden_layers),
        ("intermediate_size", raw.intermediate_size),
        ("max_position_embeddings", raw.max_position_embeddings),
        ("vocab_size", raw.vocab_size),
    ] {
        if v == 0 {
            return bad(name, "must be positive".into());
        }
    }
    if raw.hidden_size % raw.num_attention_heads != 0 {
        return bad("num_attention_heads", format!("{} does not divide hidden_size {}", raw.num_attention_heads, raw.hidden_size));
    }
    if raw.hidden_act != "gelu" {
        return bad("hidden_act", format!("{:?}: only \"gelu\" (exact) is supported", raw.hidden_act));
    }
    if raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return bad("rope_scaling", "set: scaled rotary positions are not supported".into());
    }
    let head_dim = raw.hidden_size / raw.num_attention_heads;
    let rotary_ndims = (head_dim as f64 * raw.rotary_pct) as usize;
    if !(0.0..=1.0).contains(&raw.rotary_pct) || rotary_ndims % 2 != 0 {
        return bad("rotary_pct", format!("{} of head_dim {head_dim} gives {rotary_ndims} rotary dims: expected an even number up to head_dim", raw.rotary_pct));
    }
    Ok(GptNeoxConfig {
        path: path.to_path_buf(),
        hidden_size: raw.hidden_size,
        num_attention_heads: raw.num_attention_heads,
        num_hidden_layers: raw.num_hidden_layers,
        intermediate_size: raw.intermediate_size,
        max_position_embeddings: raw.max_position_embeddings,
        vocab_size: raw.vocab_size,
        rotary_ndims,
        rotary_emb_base: raw.rotary_emb_base,
        layer_norm_eps: raw.layer_norm_eps,
        use_parallel_residual: raw.use_parallel_residual,
    })
}
