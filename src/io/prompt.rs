//! Prompts exactly as each family's processor builds them (`IdeficsProcessor`, `MllamaProcessor`, OpenFlamingo's
//! tokenizer call), and the image-attention map of the resulting tokens.

use crate::error::{Error, Result};
use crate::io::tokenizer::{Tokenizer, END_OF_UTTERANCE, FAKE_IMAGE_TOKEN, IMAGE_TOKEN, MLLAMA_IMAGE_TOKEN};

/// One element of an interleaved prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptItem {
    Text(String),
    Image,
}

/// Splits user text at each `<image>` marker. Empty text between two markers is dropped so that consecutive images
/// stay consecutive (and share the fake token between them, as the processor does for adjacent image items).
pub fn split_markers(text: &str) -> Vec<PromptItem> {
    let mut items = Vec::new();
    for (i, part) in text.split(IMAGE_TOKEN).enumerate() {
        if i > 0 {
            items.push(PromptItem::Image);
        }
        if !part.is_empty() {
            items.push(PromptItem::Text(part.to_string()));
        }
    }
    items
}

/// The processor's prompt string: `<s>`, each text item stripped of spaces, each image as
/// `<fake><image><fake>` (only `<image><fake>` right after another image), and `<end_of_utterance>` between two
/// consecutive text items when `add_end_of_utterance` is set.
pub fn build_prompt_text(
    items: &[PromptItem],
    bos_token: &str,
    add_end_of_utterance: bool,
) -> String {
    let mut text = bos_token.to_string();
    let mut last_was_image = false;
    for (i, item) in items.iter().enumerate() {
        let last_was_text = i > 0 && !last_was_image;
        match item {
            PromptItem::Text(t) => {
                if add_end_of_utterance && last_was_text {
                    text.push_str(END_OF_UTTERANCE);
                }
                text.push_str(t.trim_matches(' '));
                last_was_image = false;
            }
            PromptItem::Image => {
                if !last_was_image {
                    text.push_str(FAKE_IMAGE_TOKEN);
                }
                text.push_str(IMAGE_TOKEN);
                text.push_str(FAKE_IMAGE_TOKEN);
                last_was_image = true;
            }
        }
    }
    text
}

/// For each token, the index of the image it attends to, or -1: the latest `<image>` at or before it, nothing before
/// the first image, and nothing after an end-of-sequence token until the next `<image>` (the EOS token itself keeps
/// its image). Same rule as transformers' `image_attention_mask_for_packed_input_ids`.
pub fn image_attention(ids: &[u32], image_id: u32, eos_id: u32) -> Vec<i32> {
    let mut count = -1i32;
    let mut seen_eos = false;
    ids.iter()
        .map(|&id| {
            if id == image_id {
                count += 1;
                seen_eos = false;
            }
            let seen = if seen_eos { -1 } else { count };
            if id == eos_id {
                seen_eos = true;
            }
            seen
        })
        .collect()
}

/// Llama 3.2 Vision's cross-attention mask (`get_cross_attention_token_mask` in transformers'
/// `processing_mllama.py`) as, per token, the latest image at or before it (-1 before the first), and per image
/// whether its `<|image|>` token directly follows the previous image's: consecutive images are seen together from
/// the last one's token on, so a token sees its latest image and the run of images joined before it.
pub fn mllama_image_attention(ids: &[u32], image_id: u32) -> (Vec<i32>, Vec<bool>) {
    let mut latest = -1i32;
    let mut joins_previous = Vec::new();
    let mut previous_was_image = false;
    let image_of_token = ids
        .iter()
        .map(|&id| {
            let is_image = id == image_id;
            if is_image {
                latest += 1;
                joins_previous.push(previous_was_image);
            }
            previous_was_image = is_image;
            latest
        })
        .collect();
    (image_of_token, joins_previous)
}

/// A tokenized prompt ready for prefill.
#[derive(Clone, Debug)]
pub struct EncodedPrompt {
    pub text: String,
    pub ids: Vec<u32>,
    /// Per token: which image it attends to (-1 = none): the latest image at or before it.
    pub image_of_token: Vec<i32>,
    pub num_images: usize,
    /// Per image: seen together with the previous one (Llama 3.2 Vision's consecutive `<|image|>` tokens).
    pub joins_previous: Vec<bool>,
}

/// Llama 3.2 Vision's prompt as `MllamaProcessor` builds it: the text as given (normally a rendered chat that
/// already begins with `<|begin_of_text|>`), BOS added after any leading `<|image|>` tokens only when the text has
/// none (`build_string_from_input`), tokenized without special tokens; one `<|image|>` per image.
pub fn encode_mllama_prompt(tok: &Tokenizer, text: &str, num_images: usize) -> Result<EncodedPrompt> {
    let text = if text.contains(&tok.bos_token) {
        text.to_string()
    } else {
        let rest = text.trim_start_matches(MLLAMA_IMAGE_TOKEN);
        let leading = (text.len() - rest.len()) / MLLAMA_IMAGE_TOKEN.len();
        format!("{}{}{rest}", MLLAMA_IMAGE_TOKEN.repeat(leading), tok.bos_token)
    };
    let ids = tok.encode(&text)?;
    let found = ids.iter().filter(|&&id| id == tok.image_id).count();
    if found != num_images {
        return Err(Error::Prompt(format!(
            "the prompt has {found} `{MLLAMA_IMAGE_TOKEN}` token(s) but {num_images} image(s) were given; put one `{MLLAMA_IMAGE_TOKEN}` where each image belongs"
        )));
    }
    let (image_of_token, joins_previous) = mllama_image_attention(&ids, tok.image_id);
    Ok(EncodedPrompt {
        text,
        ids,
        image_of_token,
        num_images,
        joins_previous,
    })
}

/// OpenFlamingo's prompt as its evaluation code builds it: the text as given, few-shot examples as
/// `<image>text<|endofchunk|>`, tokenized with no BOS. Each token's cross-attention sees only the latest image at or
/// before it (`media_locations` cumulated into `text_time`, `only_attend_immediate_media`), none before the first;
/// consecutive images are never seen together.
pub fn encode_openflamingo_prompt(tok: &Tokenizer, text: &str, num_images: usize) -> Result<EncodedPrompt> {
    let ids = tok.encode(text)?;
    let found = ids.iter().filter(|&&id| id == tok.image_id).count();
    if found != num_images {
        return Err(Error::Prompt(format!(
            "the prompt has {found} `{IMAGE_TOKEN}` token(s) but {num_images} image(s) were given; put one `{IMAGE_TOKEN}` where each image belongs"
        )));
    }
    let (image_of_token, _) = mllama_image_attention(&ids, tok.image_id);
    Ok(EncodedPrompt {
        text: text.to_string(),
        ids,
        image_of_token,
        num_images,
        joins_previous: vec![false; num_images],
    })
}

/// Builds and tokenizes the prompt for user text with `<image>` markers, checking the marker count against the
/// number of images supplied.
pub fn encode_prompt(
    tok: &Tokenizer,
    user_text: &str,
    num_images: usize,
) -> Result<EncodedPrompt> {
    let items = split_markers(user_text);
    let markers = items.iter().filter(|i| **i == PromptItem::Image).count();
    if markers != num_images {
        return Err(Error::Prompt(format!(
            "the prompt has {markers} `{IMAGE_TOKEN}` marker(s) but {num_images} image(s) were given; put one `{IMAGE_TOKEN}` where each image belongs"
        )));
    }
    encode_items(tok, &items)
}

/// Tokenizes an interleaved prompt.
pub fn encode_items(tok: &Tokenizer, items: &[PromptItem]) -> Result<EncodedPrompt> {
    let text = build_prompt_text(items, &tok.bos_token, tok.end_of_utterance_id.is_some());
    let ids = tok.encode(&text)?;
    let num_images = items.iter().filter(|i| **i == PromptItem::Image).count();
    let found = ids.iter().filter(|&&id| id == tok.image_id).count();
    if found != num_images {
        return Err(Error::Prompt(format!(
            "the prompt text itself contains `{IMAGE_TOKEN}` tokens: {found} after tokenization for {num_images} image(s)"
        )));
    }
    let image_of_token = image_attention(&ids, tok.image_id, tok.eos_id);
    Ok(EncodedPrompt {
        text,
        ids,
        image_of_token,
        num_images,
        joins_previous: vec![false; num_images],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_images_share_a_fake_token() {
        let items = split_markers("A <image><image> B");
        assert_eq!(
            build_prompt_text(&items, "<s>", false),
            "<s>A<fake_token_around_image><image><fake_token_around_image><image><fake_token_around_image>B"
        );
    }

    #[test]
    fn end_of_utterance_only_between_adjacent_texts() {
        let items = vec![
            PromptItem::Text("a".into()),
            PromptItem::Text(" b ".into()),
            PromptItem::Image,
        ];
        assert_eq!(
            build_prompt_text(&items, "<s>", true),
            "<s>a<end_of_utterance>b<fake_token_around_image><image><fake_token_around_image>"
        );
    }

    #[test]
    fn mllama_consecutive_images_are_joined() {
        // x <img> y <img><img> z
        let ids = [5, 9, 6, 9, 9, 7];
        let (of_token, joined) = mllama_image_attention(&ids, 9);
        assert_eq!(of_token, vec![-1, 0, 0, 1, 2, 2]);
        assert_eq!(joined, vec![false, false, true]);
    }

    #[test]
    fn attention_resets_after_eos_and_resumes_at_next_image() {
        // <s> x <img> y </s> z <img> w
        let ids = [1, 5, 9, 6, 2, 7, 9, 8];
        assert_eq!(image_attention(&ids, 9, 2), vec![-1, -1, 0, 0, 0, -1, 1, 1]);
    }
}
