//! What a caller asks of the runtime and what it gets back: a generation request, its output and why it ended.

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
}

impl Default for GenerationRequest {
    fn default() -> Self {
        GenerationRequest {
            max_new_tokens: 32,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
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
}
