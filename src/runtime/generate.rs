//! One request end to end on one backend: prompt and images in, tokens out, streamed as they come.
//!
//! Prefill runs the vision encoder and resampler once, computes every cross-attention block's image K/V once
//! (kept for the whole request), then runs the prompt through the decoder filling the self-attention KV cache.
//! Each decode step feeds one token; new tokens see the image the last prompt token saw (transformers' rule).

use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::config::{IdeficsConfig, PreprocessorConfig};
use crate::io::image::{load_pixels, DEFAULT_MAX_PIXELS};
use crate::io::prompt::{encode_prompt, EncodedPrompt};
use crate::io::safetensors::WeightStore;
use crate::io::tokenizer::IdeficsTokenizer;
use crate::model::sampling::{Sampler, SamplingParams};
use crate::model::{Idefics, Media};
use crate::runtime::kv_cache::KvCache;

/// A model directory loaded onto a backend, with its tokenizer and image preprocessing.
pub struct Pipeline<B: Backend> {
    pub backend: B,
    pub model: Idefics<B>,
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
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        GenerationRequest {
            max_new_tokens: 32,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` or the context length.
    Length,
}

#[derive(Clone, Debug)]
pub struct GenerationOutput {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
}

impl<B: Backend> Pipeline<B> {
    pub fn load(dir: &Path, backend: B, show_progress: bool) -> Result<Self> {
        let files = ModelFiles::open(dir)?;
        let model = Idefics::load(&backend, &files.store, &files.config, show_progress)?;
        Ok(Pipeline {
            backend,
            model,
            tokenizer: files.tokenizer,
            preprocessor: files.preprocessor,
            store: files.store,
            dir: files.dir,
            max_image_pixels: DEFAULT_MAX_PIXELS,
        })
    }

    /// Builds the prompt (user text with one `<image>` per image) and preprocesses the images.
    pub fn prepare(
        &self,
        user_text: &str,
        images: &[PathBuf],
    ) -> Result<(EncodedPrompt, Vec<Vec<f32>>)> {
        let prompt = encode_prompt(&self.tokenizer, user_text, images.len())?;
        self.check_prompt(&prompt)?;
        let pixels = images
            .iter()
            .map(|p| load_pixels(p, &self.preprocessor, self.max_image_pixels))
            .collect::<Result<Vec<_>>>()?;
        Ok((prompt, pixels))
    }

    /// Rejects prompts the model cannot take: too long, or with tokens beyond the embedding rows.
    pub fn check_prompt(&self, prompt: &EncodedPrompt) -> Result<()> {
        let max = self.model.config.max_position_embeddings;
        if prompt.ids.len() > max {
            return Err(Error::Prompt(format!(
                "the prompt is {} tokens, over the model's context of {max} (max_position_embeddings in {})",
                prompt.ids.len(),
                self.model.config.path.display()
            )));
        }
        let rows = self.model.config.total_vocab();
        if let Some(&id) = prompt.ids.iter().find(|&&id| id as usize >= rows) {
            return Err(Error::TokenOutOfRange {
                id,
                token: self.tokenizer.token(id),
                rows,
            });
        }
        Ok(())
    }

    /// Vision encoder, resampler and cross-attention K/V of the request's images, computed once.
    pub fn encode_images(&self, pixels: &[Vec<f32>]) -> Media<B> {
        self.model.encode_images(&self.backend, pixels)
    }

    /// Runs the prompt through the decoder into a fresh KV cache with room for `extra` more positions; returns
    /// the cache and the final-normed hidden states of the prompt.
    pub fn prefill(
        &self,
        prompt: &EncodedPrompt,
        media: &Media<B>,
        extra: usize,
    ) -> Result<(KvCache<B>, B::Tensor)> {
        let b = &self.backend;
        let mut cache = self.model.new_cache(b, prompt.ids.len() + extra);
        let h = self.model.forward(
            b,
            &prompt.ids,
            &prompt.image_of_token,
            media,
            &mut cache,
            None,
        )?;
        Ok((cache, h))
    }

    /// Generates from a prepared prompt; `on_text` receives the text as it grows (never past a stop string).
    pub fn generate(
        &self,
        prompt: &EncodedPrompt,
        media: &Media<B>,
        req: &GenerationRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerationOutput> {
        self.check_prompt(prompt)?;
        req.sampling.validate().map_err(Error::Invalid)?;
        let b = &self.backend;
        let cfg = &self.model.config;
        let capacity = (prompt.ids.len() + req.max_new_tokens).min(cfg.max_position_embeddings);
        let mut cache = self.model.new_cache(b, capacity);
        let tok = &self.tokenizer;
        let mut sampler = Sampler::new(req.sampling.clone(), vec![tok.image_id, tok.fake_image_id]);
        let stop_ids: Vec<u32> = std::iter::once(tok.eos_id)
            .chain(tok.end_of_utterance_id)
            .collect();
        let decode_image = [*prompt.image_of_token.last().unwrap_or(&-1)];

        let mut history = prompt.ids.clone();
        let mut generated = Vec::new();
        let mut stream = TextStream::new(&req.stop);
        let mut finish = FinishReason::Length;
        let mut input: Vec<u32> = prompt.ids.clone();
        let mut image_of_input: &[i32] = &prompt.image_of_token;
        while generated.len() < req.max_new_tokens
            && cache.len() + input.len() <= capacity
            && !input.is_empty()
        {
            let h = self
                .model
                .forward(b, &input, image_of_input, media, &mut cache, None)?;
            let last = b.slice_rows(&h, b.dims(&h).0 - 1, 1);
            let mut logits = b.to_host(&self.model.logits(b, &last));
            let next = sampler.sample(&mut logits, &history);
            history.push(next);
            if stop_ids.contains(&next) {
                generated.push(next);
                finish = FinishReason::Stop;
                break;
            }
            generated.push(next);
            let text = tok.decode(&generated, true)?;
            if stream.update(&text, &mut on_text) {
                finish = FinishReason::Stop;
                break;
            }
            input = vec![next];
            image_of_input = &decode_image;
        }
        let text = stream.finish(&tok.decode(&generated, true)?, &mut on_text);
        Ok(GenerationOutput {
            prompt_ids: prompt.ids.clone(),
            generated_ids: generated,
            text,
            finish_reason: finish,
        })
    }
}

/// Incremental text output that never emits a stop string or a prefix of one that may still complete.
struct TextStream<'a> {
    stops: &'a [String],
    emitted: usize,
    stopped_at: Option<usize>,
}

impl<'a> TextStream<'a> {
    fn new(stops: &'a [String]) -> Self {
        TextStream {
            stops,
            emitted: 0,
            stopped_at: None,
        }
    }

    /// Emits what is safe of `text`; true when a stop string appeared.
    fn update(&mut self, text: &str, out: &mut impl FnMut(&str)) -> bool {
        if let Some(pos) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            self.stopped_at = Some(pos);
            self.emit_to(text, pos, out);
            return true;
        }
        let hold = self
            .stops
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut safe = text.len().saturating_sub(hold);
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        // A trailing U+FFFD is usually half of a multi-byte character whose other tokens are still to come.
        let safe = text[..safe].trim_end_matches('\u{FFFD}').len();
        self.emit_to(text, safe, out);
        false
    }

    fn emit_to(&mut self, text: &str, end: usize, out: &mut impl FnMut(&str)) {
        if end > self.emitted && text.is_char_boundary(self.emitted) {
            out(&text[self.emitted..end]);
            self.emitted = end;
        }
    }

    /// Flushes the rest and returns the final text (cut at the stop string if one appeared).
    fn finish(&mut self, text: &str, out: &mut impl FnMut(&str)) -> String {
        let end = self.stopped_at.unwrap_or(text.len()).min(text.len());
        self.emit_to(text, end, out);
        text[..end].to_string()
    }
}
