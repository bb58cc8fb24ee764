//! What a caller asks of the runtime and what it gets back: a generation request, its output and why it ended.

use crate::backend::TokenLogprobs;
use crate::model::sampling::SamplingParams;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Generate exactly `max_new_tokens` (within the context), whatever tokens come: for benchmarks.
    pub ignore_eos: bool,
    /// `Some(n)`: the log-probability of every prompt token after the first given the tokens before it (the raw
    /// model distribution: no ban, penalty or temperature), with the `n` most likely tokens at each position
    /// (OpenAI's `echo` with `logprobs`; the scoring primitive). With `max_new_tokens` 0 the prompt is still run.
    pub prompt_logprobs: Option<usize>,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        GenerationRequest {
            max_new_tokens: 32,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            prompt_logprobs: None,
        }
    }
}

impl GenerationRequest {
    /// The new tokens it runs for: one that only scores its prompt samples one token, dropped when it finishes.
    pub fn tokens_to_run(&self) -> usize {
        match self.prompt_logprobs {
            Some(_) => self.max_new_tokens.max(1),
            None => self.max_new_tokens,
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

impl FinishReason {
    /// The name OpenAI's API and our JSON outputs use.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenerationOutput {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// One per generated token when the request's sampling asked for log-probabilities, else empty.
    pub logprobs: Vec<TokenLogprobs>,
    /// One per prompt token after the first when the request asked for them, else empty.
    pub prompt_logprobs: Vec<TokenLogprobs>,
}
