//! `flamingo convert`: an OpenFlamingo model as released (checkpoint.pt, the language model's directory of
//! PyTorch files, open_clip's pickled tower) written as one folder the engine maps straight from disk:
//!
//! ```text
//! OUT/config.json                 {"model_type": "openflamingo", "lang_model": "lang_model",
//!                                  "vision_config": "vision_model/<open_clip name>.json"}
//! OUT/model.safetensors           every tensor under OpenFlamingo's names (lang_encoder.*, vision_encoder.*,
//!                                 perceiver.*), the checkpoint's replacing the language model's, dtypes as stored
//! OUT/lang_model/                 the language model's config and tokenizer files, tokenizer.json with
//!                                 OpenFlamingo's tokens added
//! OUT/vision_model/<name>.json    open_clip's model config
//! ```
//! The model is loaded (every tensor checked against its config) before anything is written, and an existing
//! non-empty OUT is refused rather than overwritten.

use std::path::{Path, PathBuf};

use crate::backend::cpu::CpuBackend;
use crate::cli::options::OpenFlamingoPartsArgs;
use crate::error::{Error, Result};
use crate::io::openflamingo_config::{
    ConvertedLayout, OpenFlamingoConfig, PartWeights, CONVERTED_LANG, CONVERTED_MODEL_TYPE, CONVERTED_VISION,
};
use crate::model::openflamingo::OpenFlamingo;
use crate::runtime::pipeline::{FamilyConfig, ModelFiles};

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The OpenFlamingo folder holding checkpoint.pt.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    parts: OpenFlamingoPartsArgs,
    /// The folder to write (created; refused if it exists and is not empty).
    #[arg(long)]
    output: PathBuf,
}

/// The language model's files kept beside the weights (tokenizer.json is written anew).
const LANG_FILES: [&str; 4] = ["config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"];

pub fn run(args: ConvertArgs) -> Result<()> {
    let files = ModelFiles::open_paths(&args.parts.paths(&args.model))?;
    let FamilyConfig::OpenFlamingo(config) = &files.config else {
        return Err(Error::Invalid(format!(
            "{} is an {} model directory: flamingo convert writes OpenFlamingo's released parts (checkpoint.pt, the \
             language model, open_clip's tower) as one folder",
            args.model.display(),
            files.config.model_type()
        )));
    };
    if let PartWeights::Converted(_) = config.parts.weights {
        return Err(Error::Invalid(format!("{} is already converted", args.model.display())));
    }
    OpenFlamingo::load(&CpuBackend::new(), &files.store, &config.vision, &config.decoder, false)?;
    let out = &args.output;
    create_empty_dir(out)?;
    let layout = write_configs(config, &files, out)?;
    let weights = out.join("model.safetensors");
    // Rotary frequencies and attention masks are buffers the decoder rebuilds, not weights.
    let written = files
        .store
        .write_safetensors(&weights, |name| !name.ends_with(".inv_freq") && !name.ends_with(".masked_bias"))?;
    let config_path = out.join("config.json");
    let json = serde_json::to_string_pretty(&layout).expect("the layout serialises");
    std::fs::write(&config_path, json).map_err(|e| Error::io(&config_path, e))?;
    let bytes = std::fs::metadata(&weights).map_err(|e| Error::io(&weights, e))?.len();
    eprintln!("wrote {} ({written} tensors, {:.1} MB) and its configs", weights.display(), bytes as f64 / 1e6);
    Ok(())
}

/// Creates `dir`, or takes it as it is when it exists and is empty.
fn create_empty_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        if entries.next().is_some() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the output folder exists and is not empty"),
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// The language model's config and tokenizer files and open_clip's config, copied into `out`'s subfolders.
fn write_configs(config: &OpenFlamingoConfig, files: &ModelFiles, out: &Path) -> Result<ConvertedLayout> {
    let (lang, vision) = (out.join(CONVERTED_LANG), out.join(CONVERTED_VISION));
    for dir in [&lang, &vision] {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    for name in LANG_FILES {
        let from = config.parts.lang_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, lang.join(name)).map_err(|e| Error::io(&from, e))?;
        }
    }
    files.tokenizer.save(&lang.join("tokenizer.json"))?;
    let vision_name = config.parts.vision_config.file_name().expect("a config file has a name");
    let from = &config.parts.vision_config;
    std::fs::copy(from, vision.join(vision_name)).map_err(|e| Error::io(from, e))?;
    Ok(ConvertedLayout {
        model_type: CONVERTED_MODEL_TYPE.into(),
        lang_model: PathBuf::from(CONVERTED_LANG),
        vision_config: Path::new(CONVERTED_VISION).join(vision_name),
    })
}
