//! `tokenizer.json` through the tokenizers crate, plus the ids of the tokens a model family gives a meaning to
//! (IDEFICS: `<image>`, `<fake_token_around_image>`, `<end_of_utterance>`; Llama 3.2 Vision: `<|image|>` and the
//! eos ids of `generation_config.json`; OpenFlamingo: `<image>` and `<|endofchunk|>`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const IMAGE_TOKEN: &str = "<image>";
pub const FAKE_IMAGE_TOKEN: &str = "<fake_token_around_image>";
pub const END_OF_UTTERANCE: &str = "<end_of_utterance>";

pub const MLLAMA_IMAGE_TOKEN: &str = "<|image|>";

/// OpenFlamingo's end of an image's text chunk: its few-shot separator, and where generation stops.
pub const END_OF_CHUNK: &str = "<|endofchunk|>";
/// The pad token OpenFlamingo adds to a tokenizer that has none (the GPT-NeoX-20B tokenizers of all its models).
pub const OPENFLAMINGO_PAD: &str = "<PAD>";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
    pub bos_token: String,
    pub bos_id: u32,
    pub eos_id: u32,
    pub image_id: u32,
    /// IDEFICS only.
    pub fake_image_id: Option<u32>,
    /// Present in the IDEFICS instruct checkpoints' tokenizers; a stop token there.
    pub end_of_utterance_id: Option<u32>,
    /// Tokens that end generation (unless a request ignores eos).
    pub stop_ids: Vec<u32>,
    /// Tokens generation never produces (markers only the prompt builder places).
    pub banned_ids: Vec<u32>,
}

fn open(path: &Path) -> Result<tokenizers::Tokenizer> {
    if !path.exists() {
        return Err(Error::Tokenizer {
            path: path.to_path_buf(),
            message: "file not found (the model directory needs the tokenizer.json it was trained with)".into(),
        });
    }
    crate::io::files::regular_file(path, crate::io::files::MAX_TOKENIZER_BYTES)?;
    tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl Tokenizer {
    /// Llama 3.2 Vision's tokenizer: `image_id` from config.json's `image_token_index` (checked to be
    /// `<|image|>`), `bos_id` and the `eos_ids` from generation_config.json (end of text, eom, eot).
    pub fn mllama(path: &Path, bos_id: u32, eos_ids: &[u32], image_id: u32) -> Result<Self> {
        let inner = open(path)?;
        let fail = |message: String| Error::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        match inner.token_to_id(MLLAMA_IMAGE_TOKEN) {
            Some(id) if id == image_id => {}
            found => {
                return Err(fail(format!(
                    "config.json image_token_index is {image_id} but the vocabulary has `{MLLAMA_IMAGE_TOKEN}` at {found:?}"
                )))
            }
        }
        let bos_token = inner
            .id_to_token(bos_id)
            .ok_or_else(|| fail(format!("bos_token_id {bos_id} is not in the vocabulary")))?;
        if let Some(&id) = eos_ids.iter().find(|&&id| inner.id_to_token(id).is_none()) {
            return Err(fail(format!("eos_token_id {id} is not in the vocabulary")));
        }
        let eos_id = *eos_ids
            .first()
            .ok_or_else(|| fail("the config lists no eos_token_id".into()))?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
            bos_token,
            bos_id,
            eos_id,
            image_id,
            fake_image_id: None,
            end_of_utterance_id: None,
            stop_ids: eos_ids.to_vec(),
            banned_ids: Vec::new(),
        })
    }

    /// Loads an IDEFICS `tokenizer.json`; `bos_id` / `eos_id` come from config.json.
    pub fn idefics(path: &Path, bos_id: u32, eos_id: u32) -> Result<Self> {
        let inner = open(path)?;
        let need = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| Error::Tokenizer {
                path: path.to_path_buf(),
                message: format!(
                    "the vocabulary has no `{token}` token, which IDEFICS prompts need"
                ),
            })
        };
        let image_id = need(IMAGE_TOKEN)?;
        let fake_image_id = need(FAKE_IMAGE_TOKEN)?;
        let bos_token = inner.id_to_token(bos_id).ok_or_else(|| Error::Tokenizer {
            path: path.to_path_buf(),
            message: format!("config.json bos_token_id {bos_id} is not in the vocabulary"),
        })?;
        let end_of_utterance_id = inner.token_to_id(END_OF_UTTERANCE);
        Ok(Tokenizer {
            end_of_utterance_id,
            inner,
            path: path.to_path_buf(),
            bos_token,
            bos_id,
            eos_id,
            image_id,
            fake_image_id: Some(fake_image_id),
            stop_ids: std::iter::once(eos_id).chain(end_of_utterance_id).collect(),
            banned_ids: vec![image_id, fake_image_id],
        })
    }

    /// OpenFlamingo's tokenizer: the language model's `tokenizer.json` with what `create_model_and_transforms`
    /// adds (factory.py L49-55): `<|endofchunk|>` and `<image>` as special tokens, then `<PAD>` when the tokenizer
    /// has no pad token (`has_pad`, from its special_tokens_map.json) — at the ids the vocabulary's end gives them,
    /// as transformers does. Files saved after OpenFlamingo's additions already have them and are kept as they
    /// are. No BOS is added to prompts; `<|endofchunk|>` stops generation (Flamingo.generate's eos); `<image>` is
    /// never generated (only the prompt builder places it, with its image).
    pub fn openflamingo(path: &Path, has_pad: bool) -> Result<Self> {
        let mut inner = open(path)?;
        let special = |t: &str| tokenizers::AddedToken::from(t.to_string(), true);
        for token in [END_OF_CHUNK, IMAGE_TOKEN] {
            if inner.token_to_id(token).is_none() {
                inner.add_special_tokens(&[special(token)]);
            }
        }
        if !has_pad && inner.token_to_id(OPENFLAMINGO_PAD).is_none() {
            inner.add_special_tokens(&[special(OPENFLAMINGO_PAD)]);
        }
        let id = |t: &str| inner.token_to_id(t).expect("added above");
        let (end_of_chunk, image_id) = (id(END_OF_CHUNK), id(IMAGE_TOKEN));
        let bos_token = "<|endoftext|>".to_string();
        Ok(Tokenizer {
            bos_id: inner.token_to_id(&bos_token).unwrap_or(0),
            bos_token,
            inner,
            path: path.to_path_buf(),
            eos_id: end_of_chunk,
            image_id,
            fake_image_id: None,
            end_of_utterance_id: None,
            stop_ids: vec![end_of_chunk],
            banned_ids: vec![image_id],
        })
    }

    /// Token ids of `text` with no special tokens added (the prompt already carries `<s>`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot encode prompt: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot decode: {e}"),
            })
    }

    /// The text token `id` adds after the tokens `before` (special tokens included), as OpenAI's `tokens` and
    /// `text_offset` describe it: decoded with a few tokens of left context (a decoder drops a leading space only
    /// at the start of a text, and byte-fallback tokens join their neighbours); a piece that is not a clean
    /// extension falls back to the token decoded alone.
    pub fn piece(&self, before: &[u32], id: u32) -> Result<String> {
        const CONTEXT: usize = 6;
        let context = &before[before.len().saturating_sub(CONTEXT)..];
        let head = self.decode(context, false)?;
        let mut ids = context.to_vec();
        ids.push(id);
        let with = self.decode(&ids, false)?;
        match with.strip_prefix(&head) {
            Some(piece) => Ok(piece.to_string()),
            None => self.decode(&[id], false),
        }
    }

    /// Writes the tokenizer (with any tokens added at load) as a `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: format!("cannot write: {e}"),
        })
    }

    pub fn token(&self, id: u32) -> String {
        self.inner
            .id_to_token(id)
            .unwrap_or_else(|| format!("<id {id}>"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
