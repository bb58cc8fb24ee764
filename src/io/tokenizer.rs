//! `tokenizer.json` through the tokenizers crate, plus the ids of the tokens IDEFICS gives a meaning to.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const IMAGE_TOKEN: &str = "<image>";
pub const FAKE_IMAGE_TOKEN: &str = "<fake_token_around_image>";
pub const END_OF_UTTERANCE: &str = "<end_of_utterance>";

pub struct IdeficsTokenizer {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
    pub bos_token: String,
    pub bos_id: u32,
    pub eos_id: u32,
    pub image_id: u32,
    pub fake_image_id: u32,
    /// Present in the instruct checkpoints' tokenizers; a stop token there.
    pub end_of_utterance_id: Option<u32>,
}

impl IdeficsTokenizer {
    /// Loads `tokenizer.json`; `bos_id` / `eos_id` come from config.json.
    pub fn from_file(path: &Path, bos_id: u32, eos_id: u32) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                message: "file not found (the model directory needs the tokenizer.json it was trained with)".into(),
            });
        }
        crate::io::files::regular_file(path, crate::io::files::MAX_TOKENIZER_BYTES)?;
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
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
        Ok(IdeficsTokenizer {
            end_of_utterance_id: inner.token_to_id(END_OF_UTTERANCE),
            inner,
            path: path.to_path_buf(),
            bos_token,
            bos_id,
            eos_id,
            image_id,
            fake_image_id,
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

    pub fn token(&self, id: u32) -> String {
        self.inner
            .id_to_token(id)
            .unwrap_or_else(|| format!("<id {id}>"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
