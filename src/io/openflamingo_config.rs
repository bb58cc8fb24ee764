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
use crate::io::config::read_json;
use crate::io::safetensors::WeightStore;

/// Where OpenFlamingo's three parts are.
#[derive(Clone, Debug)]
pub struct OpenFlamingoParts {
    pub checkpoint: PathBuf,
    /// The language model's Hugging Face directory.
    pub lang_dir: PathBuf,
    /// open_clip's model config (`<name>.json`, or the hub's `open_clip_config.json`).
    pub vision_config: PathBuf,
    pub vision_weights: PathBuf,
}

/// The file name of open_clip's weights, as the hub and `open_clip.create_model_and_transforms` save them.
pub const OPEN_CLIP_WEIGHTS: &str = "open_clip_pytorch_model.bin";

impl OpenFlamingoParts {
    /// Whether `dir` is an OpenFlamingo folder (it holds `checkpoint.pt` and no `config.json` of its own).
    pub fn is_openflamingo_dir(dir: &Path) -> bool {
        dir.join("checkpoint.pt").is_file() && !dir.join("config.json").exists()
    }

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
            checkpoint,
            lang_dir,
            vision_config,
            vision_weights,
        })
    }
}

impl OpenFlamingoParts {
    /// Every tensor of the three parts under the names of OpenFlamingo's own state dict: the language model's as
    /// `lang_encoder.*`, open_clip's vision tower's as `vision_encoder.*` (its text tower dropped), and the
    /// checkpoint's as they are, replacing the language model's where both have one (the trained, resized input
    /// embeddings), as `load_state_dict(strict=False)` does.
    pub fn open_store(&self) -> Result<WeightStore> {
        let lang = WeightStore::open_dir(&self.lang_dir)?;
        let vision = WeightStore::open_files(&[self.vision_weights.clone()], self.vision_weights.display().to_string())?;
        let checkpoint = WeightStore::open_files(&[self.checkpoint.clone()], self.checkpoint.display().to_string())?;
        let description = format!(
            "{} over {} and {}",
            self.checkpoint.display(),
            self.lang_dir.display(),
            self.vision_weights.display()
        );
        Ok(WeightStore::merged(
            vec![(lang, "", "lang_encoder."), (vision, "visual.", "vision_encoder."), (checkpoint, "", "")],
            description,
        ))
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
