//! Response bodies in OpenAI's shapes: whole responses and stream chunks of chat completions and completions,
//! with `n` choices and their log-probabilities (chat's `logprobs.content`, completions' `tokens` /
//! `token_logprobs` / `top_logprobs` / `text_offset`).

use serde_json::{json, Map, Value};

use crate::backend::TokenLogprobs;
use crate::error::Result;
use crate::io::tokenizer::Tokenizer;
use crate::runtime::request::GenerationOutput;
use crate::server::openai::{now, Api};

/// A finished choice as a response shows it.
pub struct Choice {
    pub index: usize,
    pub text: String,
    pub finish_reason: &'static str,
    pub logprobs: Option<Value>,
}

/// `usage` over a request's choices: the prompt once, every choice's tokens.
pub fn usage(outputs: &[GenerationOutput]) -> Value {
    let p = outputs.first().map_or(0, |o| o.prompt_ids.len());
    let c: usize = outputs.iter().map(|o| o.generated_ids.len()).sum();
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

impl Api {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Completions, _) => "text_completion",
        }
    }

    /// One choice of a whole response.
    fn whole_choice(self, c: &Choice) -> Value {
        let logprobs = c.logprobs.clone().unwrap_or(Value::Null);
        match self {
            Api::Chat => json!({"index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs, "finish_reason": c.finish_reason}),
            Api::Completions => json!({"index": c.index, "text": c.text, "logprobs": logprobs,
                "finish_reason": c.finish_reason}),
        }
    }

    /// A whole response body.
    pub fn response(self, id: &str, model: &str, choices: &[Choice], usage: Value) -> Value {
        let choices: Vec<Value> = choices.iter().map(|c| self.whole_choice(c)).collect();
        json!({
            "id": id, "object": self.object(false), "created": now(), "model": model,
            "choices": choices, "usage": usage,
        })
    }

    /// A stream chunk of choice `index`: text (with its tokens' log-probabilities), or (with `finish`) the
    /// last one; no text and no finish is chat's opening chunk.
    pub fn chunk(
        self,
        id: &str,
        model: &str,
        index: usize,
        text: Option<&str>,
        finish: Option<&str>,
        logprobs: Option<Value>,
    ) -> Value {
        let logprobs = logprobs.unwrap_or(Value::Null);
        let choice = match self {
            Api::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None if finish.is_none() => json!({"role": "assistant", "content": ""}),
                    None => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Api::Completions => json!({"index": index, "text": text.unwrap_or(""),
                "logprobs": logprobs, "finish_reason": finish}),
        };
        json!({
            "id": id, "object": self.object(true), "created": now(), "model": model,
            "choices": [choice],
        })
    }

    /// The usage chunk sent after the last one when `stream_options.include_usage` is set.
    pub fn usage_chunk(self, id: &str, model: &str, usage: Value) -> Value {
        json!({
            "id": id, "object": self.object(true), "created": now(), "model": model,
            "choices": [], "usage": usage,
        })
    }
}

/// Turns one choice's token log-probabilities into OpenAI's shapes, piece by piece as a stream sends them: it
/// keeps the tokens so far (each token's text is the piece it adds after them) and the text offset.
pub struct LogprobWriter<'t> {
    tokenizer: &'t Tokenizer,
    api: Api,
    ids: Vec<u32>,
    offset: usize,
}

impl<'t> LogprobWriter<'t> {
    /// After the tokens `before` (the prompt, for generated tokens).
    pub fn new(tokenizer: &'t Tokenizer, api: Api, before: &[u32]) -> Self {
        LogprobWriter {
            tokenizer,
            api,
            ids: before.to_vec(),
            offset: 0,
        }
    }

    /// The `logprobs` value of `tokens` (each an id and its log-probabilities; `None` for a prompt's first
    /// token, which has none), in the writer's API's shape.
    pub fn write(&mut self, tokens: &[(u32, Option<&TokenLogprobs>)]) -> Result<Value> {
        let mut entries = Vec::with_capacity(tokens.len());
        for &(id, lp) in tokens {
            let piece = self.tokenizer.piece(&self.ids, id)?;
            let top = match lp {
                Some(lp) => Some(self.alternatives(lp)?),
                None => None,
            };
            entries.push((piece, lp.map(|l| l.logprob), top));
            self.ids.push(id);
        }
        Ok(match self.api {
            Api::Chat => chat_logprobs(entries),
            Api::Completions => self.completion_logprobs(entries),
        })
    }

    /// The top tokens of a position, each as the piece it would add at that position.
    fn alternatives(&self, lp: &TokenLogprobs) -> Result<Vec<(String, f32)>> {
        lp.top
            .iter()
            .map(|&(id, l)| Ok((self.tokenizer.piece(&self.ids, id)?, l)))
            .collect()
    }

    fn completion_logprobs(&mut self, entries: Vec<Entry>) -> Value {
        let (mut tokens, mut logprobs, mut tops, mut offsets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (piece, lp, top) in entries {
            offsets.push(self.offset);
            self.offset += piece.len();
            tops.push(top.map_or(Value::Null, |t| {
                Value::Object(t.into_iter().map(|(p, l)| (p, json!(l))).collect::<Map<_, _>>())
            }));
            logprobs.push(lp.map_or(Value::Null, |l| json!(l)));
            tokens.push(piece);
        }
        json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
               "text_offset": offsets})
    }
}

/// A token's piece, log-probability and top alternatives.
type Entry = (String, Option<f32>, Option<Vec<(String, f32)>>);

fn chat_logprobs(entries: Vec<Entry>) -> Value {
    let one = |piece: &str, lp: f32| json!({"token": piece, "logprob": lp, "bytes": piece.as_bytes()});
    let content: Vec<Value> = entries
        .into_iter()
        .map(|(piece, lp, top)| {
            let mut e = one(&piece, lp.unwrap_or(f32::NAN));
            e["top_logprobs"] = top
                .unwrap_or_default()
                .iter()
                .map(|(p, l)| one(p, *l))
                .collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}
