//! A request body's fields, checked before anything runs: every field is one this server honours, or the request
//! is refused with a 400 naming it (a client that asks for JSON mode or tools is told, not answered as if it had
//! not asked); then the honoured fields become one engine request per choice (`n`).

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::model::sampling::{fresh_seed, SamplingParams, MAX_TOP_LOGPROBS};
use crate::runtime::request::GenerationRequest;
use crate::server::openai::{Api, ApiError, GenerationFields};

/// Fields OpenAI defines that this server does not implement: refused by name.
const REFUSED: [&str; 10] = [
    "response_format",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "best_of",
    "suffix",
    "audio",
    "modalities",
];

/// Fields both APIs honour. `user` is an end-user id for the caller's own abuse tracking: it changes no output.
const COMMON: [&str; 17] = [
    "model",
    "max_tokens",
    // `flamingo generate`'s name for max_tokens, taken as an alias.
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "user",
];

/// The most choices (`n`) one request may ask for.
pub const MAX_CHOICES: usize = 16;

/// Refuses a body with a field this server does not honour (a `null` counts as absent, as OpenAI treats it).
pub fn check_fields(api: Api, body: &Map<String, Value>) -> Result<(), ApiError> {
    let own: &[&str] = match api {
        Api::Chat => &["messages", "max_completion_tokens", "top_logprobs"],
        Api::Completions => &["prompt", "images", "echo"],
    };
    for (name, value) in body {
        if value.is_null() || own.contains(&name.as_str()) {
            continue;
        }
        if REFUSED.contains(&name.as_str()) {
            return Err(ApiError::field(name, "not supported by this server"));
        }
        if !COMMON.contains(&name.as_str()) {
            return Err(ApiError::field(name, "unknown field"));
        }
    }
    Ok(())
}

/// What a checked request asks for: one engine request per choice, and how to answer.
#[derive(Debug)]
pub struct Plan {
    pub choices: Vec<GenerationRequest>,
    pub stream: bool,
    pub include_usage: bool,
    /// Completions' `echo`: the prompt starts each choice's text (and its log-probabilities, when asked).
    pub echo: bool,
    /// Whether choices carry log-probabilities.
    pub logprobs: bool,
}

/// The plan of a request's fields; `vocab` bounds `logit_bias` ids; `max_tokens` gives the new tokens when the
/// request does not say, and at most.
pub fn plan(
    api: Api,
    f: &GenerationFields,
    vocab: usize,
    max_tokens: MaxTokens,
) -> Result<Plan, ApiError> {
    let n = f.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::field(
            "n",
            format!("must be between 1 and {MAX_CHOICES}, got {n}"),
        ));
    }
    let max_tokens_limit = max_tokens.limit;
    let max_new = f
        .max_completion_tokens
        .or(f.max_tokens)
        .unwrap_or(max_tokens.default);
    if max_new > max_tokens_limit {
        return Err(ApiError::field(
            "max_tokens",
            format!("{max_new} is over this server's limit of {max_tokens_limit}"),
        ));
    }
    let echo = f.echo.unwrap_or(false);
    let top = top_logprobs(api, f)?;
    if max_new == 0 && !(echo && top.is_some()) {
        return Err(ApiError::field(
            "max_tokens",
            "must be at least 1 (0 only scores the prompt: with echo and logprobs)",
        ));
    }
    let d = SamplingParams::default();
    let base = SamplingParams {
        temperature: f.temperature.unwrap_or(d.temperature),
        top_k: f.top_k.unwrap_or(d.top_k),
        top_p: f.top_p.unwrap_or(d.top_p),
        repetition_penalty: f.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: f.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: f.frequency_penalty.unwrap_or(d.frequency_penalty),
        logit_bias: logit_bias(f.logit_bias.as_ref(), vocab)?,
        logprobs: top,
        seed: 0,
    };
    base.validate().map_err(|m| {
        let field = m.split([' ', ':']).next().unwrap_or("sampling").to_string();
        ApiError {
            param: Some(field),
            ..ApiError::bad(m)
        }
    })?;
    let choices = (0..n)
        .map(|i| GenerationRequest {
            max_new_tokens: max_new,
            sampling: SamplingParams {
                seed: choice_seed(f.seed, i),
                ..base.clone()
            },
            stop: f.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
            ignore_eos: false,
            prompt_logprobs: if echo { top } else { None },
        })
        .collect();
    Ok(Plan {
        choices,
        stream: f.stream,
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
        echo,
        logprobs: top.is_some(),
    })
}

/// `Some(n)` when log-probabilities are asked for: chat's `logprobs: true` with `top_logprobs: n` (default 0),
/// completions' `logprobs: n`.
fn top_logprobs(api: Api, f: &GenerationFields) -> Result<Option<usize>, ApiError> {
    let range = |field: &str, n: u64| match usize::try_from(n) {
        Ok(n) if n <= MAX_TOP_LOGPROBS => Ok(n),
        _ => Err(ApiError::field(
            field,
            format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
        )),
    };
    match api {
        Api::Chat => {
            let asked = match &f.logprobs {
                None | Some(Value::Bool(false)) => false,
                Some(Value::Bool(true)) => true,
                Some(other) => {
                    return Err(ApiError::field(
                        "logprobs",
                        format!("must be true or false in chat completions, got {other}"),
                    ))
                }
            };
            match (asked, f.top_logprobs) {
                (false, Some(_)) => Err(ApiError::field(
                    "top_logprobs",
                    "needs logprobs: true",
                )),
                (false, None) => Ok(None),
                (true, top) => range("top_logprobs", top.unwrap_or(0) as u64).map(Some),
            }
        }
        Api::Completions => match &f.logprobs {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => {
                range("logprobs", n.as_u64().expect("checked")).map(Some)
            }
            Some(other) => Err(ApiError::field(
                "logprobs",
                format!("must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {other}"),
            )),
        },
    }
}

/// `logit_bias` as OpenAI sends it (token id strings to biases), checked against the vocabulary.
fn logit_bias(
    bias: Option<&HashMap<String, f32>>,
    vocab: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(bias) = bias else {
        return Ok(Vec::new());
    };
    let mut out: Vec<(u32, f32)> = bias
        .iter()
        .map(|(key, &value)| match key.parse::<u32>() {
            Ok(id) if (id as usize) < vocab => Ok((id, value)),
            _ => Err(ApiError::field(
                "logit_bias",
                format!("{key:?} is not a token id of this model's vocabulary (0 .. {vocab})"),
            )),
        })
        .collect::<Result<_, _>>()?;
    out.sort_unstable_by_key(|b| b.0);
    Ok(out)
}

/// New tokens per choice: when a request does not say, and at most.
#[derive(Clone, Copy, Debug)]
pub struct MaxTokens {
    pub default: usize,
    pub limit: usize,
}

impl MaxTokens {
    /// The limit, also the default (the server's `--max-tokens`).
    pub fn up_to(limit: usize) -> Self {
        MaxTokens { default: limit, limit }
    }
}

/// Choice `i`'s seed: the request's own for the first choice, a distinct one derived from it for the others (so
/// `n` seeded choices differ and repeat); fresh entropy when the request gives none.
fn choice_seed(seed: Option<u64>, i: usize) -> u64 {
    match seed {
        Some(s) if i == 0 => s,
        // splitmix64 of (seed, i): well spread, and never the seed of choice 0.
        Some(s) => {
            let mut z = s.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        None => fresh_seed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: Value) -> GenerationFields {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn refused_and_unknown_fields_are_named() {
        let body = |v: Value| v.as_object().unwrap().clone();
        for (api, v, field) in [
            (Api::Chat, serde_json::json!({"messages": [], "tools": []}), "tools"),
            (Api::Completions, serde_json::json!({"prompt": "x", "suffix": "y"}), "suffix"),
            (Api::Chat, serde_json::json!({"messages": [], "echo": true}), "echo"),
            (Api::Completions, serde_json::json!({"prompt": "x", "frobnicate": 1}), "frobnicate"),
        ] {
            let e = check_fields(api, &body(v)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field));
            assert!(e.message.starts_with(field), "{}", e.message);
        }
        let ok = serde_json::json!({"messages": [], "response_format": null, "logprobs": true, "seed": 1});
        assert!(check_fields(Api::Chat, &body(ok)).is_ok());
    }

    #[test]
    fn choices_get_distinct_reproducible_seeds_and_fresh_ones_without() {
        let f = fields(serde_json::json!({"n": 3, "seed": 5, "temperature": 1.0}));
        let seeds = |f: &GenerationFields| -> Vec<u64> {
            plan(Api::Chat, f, 100, MaxTokens::up_to(64)).unwrap().choices.iter().map(|c| c.sampling.seed).collect()
        };
        let a = seeds(&f);
        assert_eq!(a, seeds(&f));
        assert_eq!(a[0], 5);
        assert!(a[0] != a[1] && a[1] != a[2] && a[0] != a[2]);
        let unseeded = fields(serde_json::json!({"temperature": 1.0}));
        assert_ne!(seeds(&unseeded), seeds(&unseeded));
    }

    #[test]
    fn logprobs_bias_and_limits_are_checked() {
        let p = |v: Value, api| plan(api, &fields(v), 100, MaxTokens::up_to(64));
        let chat = p(serde_json::json!({"logprobs": true, "top_logprobs": 3}), Api::Chat).unwrap();
        assert_eq!(chat.choices[0].sampling.logprobs, Some(3));
        assert!(chat.choices[0].prompt_logprobs.is_none());
        let echo = p(serde_json::json!({"logprobs": 2, "echo": true, "max_tokens": 0}), Api::Completions)
            .unwrap();
        assert_eq!(echo.choices[0].prompt_logprobs, Some(2));
        let bias = p(serde_json::json!({"logit_bias": {"7": -100, "3": 5}}), Api::Chat).unwrap();
        assert_eq!(bias.choices[0].sampling.logit_bias, [(3, 5.0), (7, -100.0)]);
        for (v, api, field) in [
            (serde_json::json!({"top_logprobs": 2}), Api::Chat, "top_logprobs"),
            (serde_json::json!({"logprobs": true, "top_logprobs": 21}), Api::Chat, "top_logprobs"),
            (serde_json::json!({"logprobs": 3}), Api::Chat, "logprobs"),
            (serde_json::json!({"logprobs": true}), Api::Completions, "logprobs"),
            (serde_json::json!({"logit_bias": {"100": 1}}), Api::Chat, "logit_bias"),
            (serde_json::json!({"logit_bias": {"x": 1}}), Api::Chat, "logit_bias"),
            (serde_json::json!({"logit_bias": {"1": 200}}), Api::Chat, "logit_bias"),
            (serde_json::json!({"presence_penalty": 3}), Api::Chat, "presence_penalty"),
            (serde_json::json!({"n": 0}), Api::Chat, "n"),
            (serde_json::json!({"n": 17}), Api::Chat, "n"),
            (serde_json::json!({"max_tokens": 65}), Api::Chat, "max_tokens"),
            (serde_json::json!({"max_tokens": 0}), Api::Completions, "max_tokens"),
        ] {
            let e = p(v.clone(), api).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{v}: {}", e.message);
        }
    }
}
