//! A loaded model and what one request needs around it: the model directory's files, prompt building, image
//! preprocessing, the checks a request passes before it runs, and prefill of one prompt as one step.
//!
//! Prefill runs the vision encoder and resampler once, computes every cross-attention block's image K/V once
//! (kept for the whole request), then runs the prompt through the decoder filling the self-attention KV cache.

use std::path::{Path, PathBuf};

use image::DynamicImage;

use crate::backend::{Backend, SeqStep, StepLayout};
use crate::error::{Error, Result};
use crate::io::chat_template::ChatTemplate;
use crate::io::config::{GenerationConfig, IdeficsConfig, PreprocessorConfig};
use crate::io::image::{load_image, preprocess, to_rgb, DecodeLimits, PreparedImage, DEFAULT_MAX_PIXELS};
use crate::io::mllama_config::{model_type, MllamaConfig, MllamaPreprocessorConfig};
use crate::io::openflamingo_config::{OpenFlamingoConfig, OpenFlamingoParts, CONVERTED_MODEL_TYPE};
use crate::io::prompt::{encode_mllama_prompt, encode_openflamingo_prompt, encode_prompt, EncodedPrompt};
use crate::io::{mllama_image, openflamingo_image};
use crate::io::safetensors::WeightStore;
use crate::io::tokenizer::Tokenizer;
use crate::model::idefics::synthetic::Preset;
use crate::model::idefics::Idefics;
use crate::model::mllama::synthetic as mllama_synthetic;
use crate::model::mllama::Mllama;
use crate::model::openflamingo::OpenFlamingo;
use crate::model::{store_images, Model};
use crate::cache::media_cache::MediaCache;

/// The model of a directory as its family's code has it.
pub enum Family<B: Backend> {
    Idefics(Idefics<B>),
    Mllama(Mllama<B>),
    OpenFlamingo(OpenFlamingo<B>),
}

/// A family's `config.json` (OpenFlamingo: its parts' configs).
pub enum FamilyConfig {
    Idefics(IdeficsConfig),
    Mllama(MllamaConfig),
    OpenFlamingo(OpenFlamingoConfig),
}

impl FamilyConfig {
    /// The config's `model_type`, as `inspect` reports it.
    pub fn model_type(&self) -> &'static str {
        match self {
            FamilyConfig::Idefics(_) => "idefics",
            FamilyConfig::Mllama(_) => "mllama",
            FamilyConfig::OpenFlamingo(_) => "openflamingo",
        }
    }

    /// The config.json that sizes the model (OpenFlamingo: its language model's).
    pub fn path(&self) -> &Path {
        match self {
            FamilyConfig::Idefics(c) => &c.path,
            FamilyConfig::Mllama(c) => &c.path,
            FamilyConfig::OpenFlamingo(c) => c.decoder.path(),
        }
    }
}

/// A family's image preprocessing (`preprocessor_config.json`; OpenFlamingo: open_clip's eval transform at the
/// vision tower's image size).
pub enum Preprocessor {
    Idefics(PreprocessorConfig),
    Mllama(MllamaPreprocessorConfig),
    OpenFlamingo { image_size: usize },
}

impl Preprocessor {
    /// A decoded image as the family's processor prepares it (IDEFICS and Llama 3.2 Vision composite alpha over
    /// white first; open_clip resizes in the file's own mode, then drops alpha).
    pub fn prepare(&self, img: DynamicImage) -> PreparedImage {
        match self {
            Preprocessor::Idefics(c) => PreparedImage::whole(preprocess(&to_rgb(img), c)),
            Preprocessor::Mllama(c) => mllama_image::preprocess(&to_rgb(img), c),
            Preprocessor::OpenFlamingo { image_size } => openflamingo_image::preprocess(&img, *image_size),
        }
    }
}

/// How chat messages render without a template: IDEFICS' format, or not at all (a family with no chat format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatFallback {
    Idefics,
    None { family: &'static str },
}

/// Where a model's files are: a Hugging Face model directory, or an OpenFlamingo folder (`checkpoint.pt`) whose
/// language model and open_clip tower are given, or found as its subfolders.
#[derive(Clone, Debug, Default)]
pub struct ModelPaths {
    pub dir: PathBuf,
    /// OpenFlamingo: the language model's Hugging Face directory (`--lang-model`).
    pub lang_model: Option<PathBuf>,
    /// OpenFlamingo: open_clip's weights file or the folder holding it (`--vision-model`).
    pub vision_model: Option<PathBuf>,
}

impl ModelPaths {
    /// A directory with nothing given beside it.
    pub fn dir(dir: &Path) -> Self {
        ModelPaths { dir: dir.to_path_buf(), ..Default::default() }
    }

    /// Every weight of the model, mapped, not read (to size a device's weight arena before loading).
    pub fn open_weights(&self) -> Result<WeightStore> {
        match OpenFlamingoConfig::is_openflamingo_dir(&self.dir) {
            true => OpenFlamingoParts::locate(&self.dir, self.lang_model.as_deref(), self.vision_model.as_deref())?
                .open_store(),
            false => WeightStore::open_dir(&self.dir),
        }
    }
}

/// A model directory loaded onto a backend, with its tokenizer and image preprocessing.
pub struct Pipeline<B: Backend> {
    pub backend: B,
    /// The model as its family's code has it (family-specific tools: goldens, benchmarks' cost model); the
    /// runtime drives it through [`Pipeline::model`].
    pub family: Family<B>,
    pub tokenizer: Tokenizer,
    pub preprocessor: Preprocessor,
    pub store: WeightStore,
    pub dir: PathBuf,
    /// The model's own Jinja chat template, where its files have one.
    pub chat_template: Option<ChatTemplate>,
    /// Images with more pixels than this are refused before decoding.
    pub max_image_pixels: u64,
}

/// The files of a Hugging Face model directory, parsed and checked, before any weight is touched.
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: FamilyConfig,
    pub preprocessor: Preprocessor,
    pub tokenizer: Tokenizer,
    pub store: WeightStore,
    pub chat_template: Option<ChatTemplate>,
}

impl ModelFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_paths(&ModelPaths::dir(dir))
    }

    /// The model at `paths`: an OpenFlamingo folder, else a Hugging Face directory of a family its config.json
    /// names.
    pub fn open_paths(paths: &ModelPaths) -> Result<Self> {
        let dir = paths.dir.as_path();
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        if OpenFlamingoConfig::is_openflamingo_dir(dir) {
            let config =
                OpenFlamingoConfig::open(dir, paths.lang_model.as_deref(), paths.vision_model.as_deref())?;
            return Self::openflamingo(dir, config);
        }
        if let Some(flag) = [("--lang-model", &paths.lang_model), ("--vision-model", &paths.vision_model)]
            .into_iter()
            .find_map(|(flag, given)| given.as_ref().map(|_| flag))
        {
            return Err(Error::Invalid(format!(
                "{flag} is for OpenFlamingo folders (a checkpoint.pt and no config.json); {} is not one",
                dir.display()
            )));
        }
        let config_path = dir.join("config.json");
        let (config, preprocessor, tokenizer) = match model_type(&config_path)?.as_str() {
            "idefics" => Self::idefics(dir, &config_path)?,
            "mllama" => Self::mllama(dir, &config_path)?,
            CONVERTED_MODEL_TYPE => {
                let parts = OpenFlamingoParts::converted(dir, &config_path)?;
                return Self::openflamingo(dir, OpenFlamingoConfig::of_parts(parts)?);
            }
            other => {
                return Err(Error::config(
                    &config_path,
                    "model_type",
                    format!("{other:?} is not a supported model family (idefics, mllama, openflamingo)"),
                ))
            }
        };
        let eos = tokenizer.token(tokenizer.eos_id);
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            config,
            preprocessor,
            chat_template: ChatTemplate::from_model_dir(dir, &tokenizer.bos_token, &eos)?,
            tokenizer,
            store: WeightStore::open_dir(dir)?,
        })
    }

    fn idefics(dir: &Path, config_path: &Path) -> Result<(FamilyConfig, Preprocessor, Tokenizer)> {
        let config = IdeficsConfig::from_file(config_path)?;
        let pp_path = dir.join("preprocessor_config.json");
        let preprocessor = if pp_path.exists() {
            PreprocessorConfig::from_file(&pp_path, &config.vision_config)?
        } else {
            PreprocessorConfig::default_for(&config.vision_config)
        };
        let tokenizer = Tokenizer::idefics(
            &dir.join("tokenizer.json"),
            config.bos_token_id.unwrap_or(1),
            config.eos_token_id.unwrap_or(2),
        )?;
        Ok((
            FamilyConfig::Idefics(config),
            Preprocessor::Idefics(preprocessor),
            tokenizer,
        ))
    }

    /// Llama 3.2 Vision: eos ids from `generation_config.json` where it has them (the instruct models stop at
    /// end of text, eom and eot), else from the text config.
    fn mllama(dir: &Path, config_path: &Path) -> Result<(FamilyConfig, Preprocessor, Tokenizer)> {
        let config = MllamaConfig::from_file(config_path)?;
        let preprocessor = MllamaPreprocessorConfig::load(
            &dir.join("preprocessor_config.json"),
            &config.vision_config,
        )?;
        let generation = GenerationConfig::load(&dir.join("generation_config.json"))?;
        let t = &config.text_config;
        let eos = generation
            .eos_token_id
            .or_else(|| t.eos_token_id.clone())
            .map(|e| e.to_vec())
            .unwrap_or_default();
        let bos = generation.bos_token_id.or(t.bos_token_id).unwrap_or(128000);
        let tokenizer = Tokenizer::mllama(&dir.join("tokenizer.json"), bos, &eos, config.image_token_index)?;
        Ok((
            FamilyConfig::Mllama(config),
            Preprocessor::Mllama(preprocessor),
            tokenizer,
        ))
    }

    /// OpenFlamingo (as released, or converted): the configs of its three parts, the language model's tokenizer with OpenFlamingo's added
    /// tokens, open_clip's preprocessing, and one store of every part's tensors under OpenFlamingo's names.
    fn openflamingo(dir: &Path, config: OpenFlamingoConfig) -> Result<Self> {
        let tokenizer =
            Tokenizer::openflamingo(&config.parts.lang_dir.join("tokenizer.json"), config.declares_pad_token()?)?;
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            preprocessor: Preprocessor::OpenFlamingo { image_size: config.vision.vision.image_size },
            tokenizer,
            store: config.parts.open_store()?,
            chat_template: None,
            config: FamilyConfig::OpenFlamingo(config),
        })
    }

    /// A synthetic model (random weights generated as they load) with `tokenizer` (any IDEFICS tokenizer: the
    /// text of a random model is noise, and benchmarks feed token ids directly).
    pub fn synthetic(preset: Preset, tokenizer: &Path) -> Result<Self> {
        let config = preset.config()?;
        Ok(ModelFiles {
            dir: PathBuf::from(preset.description()),
            preprocessor: Preprocessor::Idefics(PreprocessorConfig::default_for(&config.vision_config)),
            tokenizer: Tokenizer::idefics(
                tokenizer,
                config.bos_token_id.unwrap_or(1),
                config.eos_token_id.unwrap_or(2),
            )?,
            store: preset.store()?,
            chat_template: None,
            config: FamilyConfig::Idefics(config),
        })
    }
}

impl ModelFiles {
    /// Llama 3.2 11B Vision with random bf16 weights, the 11B config's preprocessing, and a Llama-3-shaped
    /// tokenizer with the real special ids (`assets/configs/mllama-tokenizer.json`: benchmarks feed token ids).
    pub fn synthetic_mllama_11b() -> Result<Self> {
        let config = mllama_synthetic::config_11b()?;
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/configs");
        let t = &config.text_config;
        let eos = t.eos_token_id.as_ref().map(|e| e.to_vec()).unwrap_or_default();
        Ok(ModelFiles {
            dir: PathBuf::from("<synthetic mllama-11b>"),
            preprocessor: Preprocessor::Mllama(MllamaPreprocessorConfig::default_for(&config.vision_config)?),
            tokenizer: Tokenizer::mllama(
                &assets.join("mllama-tokenizer.json"),
                t.bos_token_id.unwrap_or(128000),
                &eos,
                config.image_token_index,
            )?,
            store: mllama_synthetic::store_11b()?,
            chat_template: None,
            config: FamilyConfig::Mllama(config),
        })
    }
}

impl<B: Backend> Pipeline<B> {
    pub fn load(dir: &Path, backend: B, show_progress: bool) -> Result<Self> {
        Self::load_paths(&ModelPaths::dir(dir), backend, show_progress)
    }

    pub fn load_paths(paths: &ModelPaths, backend: B, show_progress: bool) -> Result<Self> {
        Self::from_files(ModelFiles::open_paths(paths)?, backend, show_progress)
    }

    /// Loads checked model files onto `backend`; refuses weights larger than the memory the backend has free.
    pub fn from_files(files: ModelFiles, backend: B, show_progress: bool) -> Result<Self> {
        check_fits(&files, &backend)?;
        let family = match &files.config {
            FamilyConfig::Idefics(c) => Family::Idefics(Idefics::load(&backend, &files.store, c, show_progress)?),
            FamilyConfig::Mllama(c) => Family::Mllama(Mllama::load(&backend, &files.store, c, show_progress)?),
            FamilyConfig::OpenFlamingo(c) => Family::OpenFlamingo(OpenFlamingo::load(
                &backend,
                &files.store,
                &c.vision,
                &c.decoder,
                show_progress,
            )?),
        };
        Ok(Pipeline {
            backend,
            family,
            tokenizer: files.tokenizer,
            preprocessor: files.preprocessor,
            store: files.store,
            dir: files.dir,
            chat_template: files.chat_template,
            max_image_pixels: DEFAULT_MAX_PIXELS,
        })
    }

    /// The model as the runtime drives it.
    pub fn model(&self) -> &dyn Model<B> {
        match &self.family {
            Family::Idefics(m) => m,
            Family::Mllama(m) => m,
            Family::OpenFlamingo(m) => m,
        }
    }

    /// The IDEFICS model, for the tools that exist only for it (synthetic benchmarks, their cost model).
    pub fn idefics(&self) -> Result<&Idefics<B>> {
        match &self.family {
            Family::Idefics(m) => Ok(m),
            Family::Mllama(_) | Family::OpenFlamingo(_) => Err(Error::Invalid(format!(
                "{} is a {} model; this tool supports IDEFICS models only so far",
                self.dir.display(),
                self.family_name()
            ))),
        }
    }

    /// The family's name in messages.
    pub fn family_name(&self) -> &'static str {
        match &self.family {
            Family::Idefics(_) => "IDEFICS",
            Family::Mllama(_) => "Llama 3.2 Vision",
            Family::OpenFlamingo(_) => "OpenFlamingo",
        }
    }

    /// How chat messages render when neither the server nor the model gives a template.
    pub fn chat_fallback(&self) -> ChatFallback {
        match &self.family {
            Family::Idefics(_) | Family::Mllama(_) => ChatFallback::Idefics,
            Family::OpenFlamingo(_) => ChatFallback::None { family: self.family_name() },
        }
    }

    /// The config.json the model was read from (for messages).
    fn config_path(&self) -> &Path {
        match &self.family {
            Family::Idefics(m) => &m.config.path,
            Family::Mllama(m) => &m.config.path,
            Family::OpenFlamingo(m) => m.decoder.path(),
        }
    }

    /// The LM head's logits of hidden states `h`.
    pub fn logits(&self, h: &B::Tensor) -> B::Tensor {
        self.model().logits(&self.backend, h)
    }

    /// Builds the prompt (IDEFICS: user text with one `<image>` per image; Llama 3.2 Vision: the processor's
    /// text with one `<|image|>` per image; OpenFlamingo: its text as given, one `<image>` per image) and
    /// preprocesses the images.
    pub fn prepare(
        &self,
        user_text: &str,
        images: &[PathBuf],
    ) -> Result<(EncodedPrompt, Vec<PreparedImage>)> {
        let prompt = self.prompt_for(user_text, images.len())?;
        let limits = DecodeLimits::pixels(self.max_image_pixels);
        let pixels = images
            .iter()
            .map(|p| Ok(self.preprocessor.prepare(load_image(p, &limits)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok((prompt, pixels))
    }

    /// The prompt for `user_text` with `num_images` images, checked before any image is decoded.
    pub fn prompt_for(&self, user_text: &str, num_images: usize) -> Result<EncodedPrompt> {
        let prompt = match self.family {
            Family::Idefics(_) => encode_prompt(&self.tokenizer, user_text, num_images)?,
            Family::Mllama(_) => encode_mllama_prompt(&self.tokenizer, user_text, num_images)?,
            Family::OpenFlamingo(_) => encode_openflamingo_prompt(&self.tokenizer, user_text, num_images)?,
        };
        self.check_prompt(&prompt)?;
        Ok(prompt)
    }

    /// Rejects prompts the model cannot take: too long, or with tokens beyond the embedding rows.
    pub fn check_prompt(&self, prompt: &EncodedPrompt) -> Result<()> {
        let max = self.model().context_len();
        if prompt.ids.len() > max {
            return Err(Error::Prompt(format!(
                "the prompt is {} tokens, over the model's context of {max} (max_position_embeddings in {})",
                prompt.ids.len(),
                self.config_path().display()
            )));
        }
        let rows = self.model().vocab_rows();
        if let Some(&id) = prompt.ids.iter().find(|&&id| id as usize >= rows) {
            return Err(Error::TokenOutOfRange {
                id,
                token: self.tokenizer.token(id),
                rows,
            });
        }
        Ok(())
    }

    /// Positions a request may use: its prompt and new tokens, within the model's context.
    pub fn positions_for(&self, prompt: &EncodedPrompt, max_new_tokens: usize) -> usize {
        // Saturating: a huge max_new_tokens means "up to the context", never a wrapped small number.
        (prompt.ids.len().saturating_add(max_new_tokens)).min(self.model().context_len())
    }

    /// What the cross-attention sees of the images: vision encoder then resampler.
    pub fn encode_images(&self, pixels: &[PreparedImage]) -> B::Tensor {
        self.model().encode_images(&self.backend, pixels)
    }

    /// Runs a prompt through the decoder as one step and returns its final-normed hidden states (and, with
    /// `hidden_states`, every layer's, as transformers reports them).
    pub fn prefill(
        &self,
        prompt: &EncodedPrompt,
        images: &[PreparedImage],
        hidden_states: Option<&mut Vec<B::Tensor>>,
    ) -> Result<B::Tensor> {
        self.check_prompt(prompt)?;
        let (b, model) = (&self.backend, self.model());
        let mut media = model.new_media_cache(b, images.len());
        let slots: Vec<u32> = (0..images.len() as u32).collect();
        store_images(model, b, &mut media, images, &prompt.joins_previous, &slots);
        self.prefill_in(prompt, &media, hidden_states)
    }

    /// `prefill` from image states already computed (`[images * tokens_per_image, D_vision]`), every image's
    /// rows all visible.
    pub fn prefill_states(
        &self,
        prompt: &EncodedPrompt,
        image_states: &B::Tensor,
        hidden_states: Option<&mut Vec<B::Tensor>>,
    ) -> Result<B::Tensor> {
        self.check_prompt(prompt)?;
        let (b, model) = (&self.backend, self.model());
        let mut media = model.new_media_cache(b, prompt.num_images);
        let slots: Vec<u32> = (0..prompt.num_images as u32).collect();
        media.write(b, &model.cross_kv(b, image_states), &slots);
        self.prefill_in(prompt, &media, hidden_states)
    }

    /// The prompt as one step over a fresh KV cache, its images in `media` slots `0 ..`.
    fn prefill_in(
        &self,
        prompt: &EncodedPrompt,
        media: &MediaCache<B>,
        hidden_states: Option<&mut Vec<B::Tensor>>,
    ) -> Result<B::Tensor> {
        let (b, model) = (&self.backend, self.model());
        let n = prompt.ids.len();
        let block_size = n.max(1);
        // One block holds the whole prompt: nothing else shares this cache.
        let mut kv = model.new_kv_cache(b, 1, block_size);
        let step = StepLayout {
            block_size,
            seqs: vec![SeqStep {
                q_rows: n,
                kv_len: n,
                block_table: vec![0],
                image_of_row: prompt.image_of_token.clone(),
                decode_from: n,
            }],
        };
        let layout = b.layout(&step);
        model.forward(b, &prompt.ids, &step, &layout, &mut kv, media, hidden_states)
    }
}

/// Generated weights take memory of their own (mapped checkpoints only page cache): refuse a synthetic model the
/// backend cannot hold, before generating any of it. Over one H200 is refused on every device: that is the largest
/// the engine targets, and such a model needs compressed weights first.
fn check_fits<B: Backend>(files: &ModelFiles, backend: &B) -> Result<()> {
    if !files.store.is_generated() {
        return Ok(());
    }
    let need = files.store.bytes_as(|d| backend.weight_width(d));
    let gb = |b: usize| b as f64 / 1e9;
    let name = files.dir.display();
    if need > H200_BYTES {
        return Err(Error::Invalid(format!(
            "{name} needs {:.1} GB for its weights: it does not fit on one H200 ({:.0} GB); running it needs \
             compressed (quantized) weights, which the engine does not have yet",
            gb(need),
            gb(H200_BYTES)
        )));
    }
    let free = backend.free_memory()?;
    if need > free {
        return Err(Error::Invalid(format!(
            "{name} needs {:.1} GB for its weights, more than the {:.1} GB free on {}",
            gb(need),
            gb(free),
            backend.device_name()
        )));
    }
    Ok(())
}

/// One H200's memory.
const H200_BYTES: usize = 141_000_000_000;
