//! A loaded model and what one request needs around it: the model directory's files, prompt building, image
//! preprocessing, the checks a request passes before it runs, and prefill of one prompt as one step.
//!
//! Prefill runs the vision encoder and resampler once, computes every cross-attention block's image K/V once
//! (kept for the whole request), then runs the prompt through the decoder filling the self-attention KV cache.

use std::path::{Path, PathBuf};

use crate::backend::{Backend, SeqStep, StepLayout};
use crate::error::{Error, Result};
use crate::io::config::{IdeficsConfig, PreprocessorConfig};
use crate::io::image::{load_pixels, DecodeLimits, DEFAULT_MAX_PIXELS};
use crate::io::prompt::{encode_prompt, EncodedPrompt};
use crate::io::safetensors::WeightStore;
use crate::io::tokenizer::IdeficsTokenizer;
use crate::model::idefics::synthetic::Preset;
use crate::model::idefics::Idefics;
use crate::model::Model;

/// A model directory loaded onto a backend, with its tokenizer and image preprocessing.
pub struct Pipeline<B: Backend> {
    pub backend: B,
    /// The model as its family's code has it (family-specific tools: goldens, benchmarks' cost model); the
    /// runtime drives it through [`Pipeline::model`].
    pub idefics: Idefics<B>,
    pub tokenizer: IdeficsTokenizer,
    pub preprocessor: PreprocessorConfig,
    pub store: WeightStore,
    pub dir: PathBuf,
    /// Images with more pixels than this are refused before decoding.
    pub max_image_pixels: u64,
}

/// The files of a Hugging Face IDEFICS directory, parsed and checked, before any weight is touched.
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: IdeficsConfig,
    pub preprocessor: PreprocessorConfig,
    pub tokenizer: IdeficsTokenizer,
    pub store: WeightStore,
}

impl ModelFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config = IdeficsConfig::from_file(&dir.join("config.json"))?;
        let pp_path = dir.join("preprocessor_config.json");
        let preprocessor = if pp_path.exists() {
            PreprocessorConfig::from_file(&pp_path, &config.vision_config)?
        } else {
            PreprocessorConfig::default_for(&config.vision_config)
        };
        let tokenizer = IdeficsTokenizer::from_file(
            &dir.join("tokenizer.json"),
            config.bos_token_id.unwrap_or(1),
            config.eos_token_id.unwrap_or(2),
        )?;
        let store = WeightStore::open_dir(dir)?;
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            config,
            preprocessor,
            tokenizer,
            store,
        })
    }

    /// A synthetic model (random weights generated as they load) with `tokenizer` (any IDEFICS tokenizer: the
    /// text of a random model is noise, and benchmarks feed token ids directly).
    pub fn synthetic(preset: Preset, tokenizer: &Path) -> Result<Self> {
        let config = preset.config()?;
        Ok(ModelFiles {
            dir: PathBuf::from(preset.description()),
            preprocessor: PreprocessorConfig::default_for(&config.vision_config),
            tokenizer: IdeficsTokenizer::from_file(
                tokenizer,
                config.bos_token_id.unwrap_or(1),
                config.eos_token_id.unwrap_or(2),
            )?,
            store: preset.store()?,
            config,
        })
    }
}

impl<B: Backend> Pipeline<B> {
    pub fn load(dir: &Path, backend: B, show_progress: bool) -> Result<Self> {
        Self::from_files(ModelFiles::open(dir)?, backend, show_progress)
    }

    /// Loads checked model files onto `backend`; refuses weights larger than the memory the backend has free.
    pub fn from_files(files: ModelFiles, backend: B, show_progress: bool) -> Result<Self> {
        check_fits(&files, &backend)?;
        let model = Idefics::load(&backend, &files.store, &files.config, show_progress)?;
        Ok(Pipeline {
            backend,
            idefics: model,
            tokenizer: files.tokenizer,
            preprocessor: files.preprocessor,
            store: files.store,
            dir: files.dir,
            max_image_pixels: DEFAULT_MAX_PIXELS,
        })
    }

    /// The model as the runtime drives it.
    pub fn model(&self) -> &dyn Model<B> {
        &self.idefics
    }

    /// The LM head's logits of hidden states `h`.
    pub fn logits(&self, h: &B::Tensor) -> B::Tensor {
        self.model().logits(&self.backend, h)
    }

    /// Builds the prompt (user text with one `<image>` per image) and preprocesses the images.
    pub fn prepare(
        &self,
        user_text: &str,
        images: &[PathBuf],
    ) -> Result<(EncodedPrompt, Vec<Vec<f32>>)> {
        let prompt = self.prompt_for(user_text, images.len())?;
        let limits = DecodeLimits::pixels(self.max_image_pixels);
        let pixels = images
            .iter()
            .map(|p| load_pixels(p, &self.preprocessor, &limits))
            .collect::<Result<Vec<_>>>()?;
        Ok((prompt, pixels))
    }

    /// The prompt for `user_text` with `num_images` images, checked before any image is decoded.
    pub fn prompt_for(&self, user_text: &str, num_images: usize) -> Result<EncodedPrompt> {
        let prompt = encode_prompt(&self.tokenizer, user_text, num_images)?;
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
                self.idefics.config.path.display()
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
    pub fn encode_images(&self, pixels: &[Vec<f32>]) -> B::Tensor {
        self.model().encode_images(&self.backend, pixels)
    }

    /// Runs a prompt through the decoder as one step and returns its final-normed hidden states (and, with
    /// `hidden_states`, every layer's, as transformers reports them).
    pub fn prefill(&self, prompt: &EncodedPrompt, pixels: &[Vec<f32>]) -> Result<B::Tensor> {
        self.prefill_states(prompt, &self.encode_images(pixels), None)
    }

    /// `prefill` from image states already computed (`[images * tokens_per_image, D_vision]`).
    pub fn prefill_states(
        &self,
        prompt: &EncodedPrompt,
        image_states: &B::Tensor,
        hidden_states: Option<&mut Vec<B::Tensor>>,
    ) -> Result<B::Tensor> {
        self.check_prompt(prompt)?;
        let (b, model) = (&self.backend, self.model());
        let n = prompt.ids.len();
        let block_size = n.max(1);
        // One block holds the whole prompt, one slot each image: nothing else shares these caches.
        let mut kv = model.new_kv_cache(b, 1, block_size);
        let block_table = vec![0];
        let mut media = model.new_media_cache(b, prompt.num_images);
        let slots: Vec<u32> = (0..prompt.num_images as u32).collect();
        media.write(b, &model.cross_kv(b, image_states), &slots);
        let step = StepLayout {
            block_size,
            seqs: vec![SeqStep {
                q_rows: n,
                kv_len: n,
                block_table,
                image_of_row: prompt
                    .image_of_token
                    .iter()
                    .map(|&j| usize::try_from(j).map_or(-1, |j| slots[j] as i32))
                    .collect(),
            }],
        };
        let layout = b.layout(&step);
        model.forward(b, &prompt.ids, &layout, &mut kv, &media, hidden_states)
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
