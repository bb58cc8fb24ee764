//! Single-request generation: the batching engine (`runtime::engine`) run with that one request. Each decode step
//! feeds one token; new tokens see the image the last prompt token saw (transformers' rule).

use crate::io::image::PreparedImage;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::prompt::EncodedPrompt;
use crate::runtime::engine::{Engine, EngineConfig, Event};
use crate::runtime::pipeline::Pipeline;
use crate::runtime::request::{GenerationOutput, GenerationRequest};

impl<B: Backend> Pipeline<B> {
    /// Generates from a prepared prompt; `on_text` receives the text as it grows (never past a stop string). Runs
    /// the batching engine with this one request.
    pub fn generate(
        &self,
        prompt: &EncodedPrompt,
        pixels: Vec<PreparedImage>,
        req: &GenerationRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerationOutput> {
        let block_size = 16;
        let config = EngineConfig {
            block_size,
            kv_blocks: self
                .positions_for(prompt, req.tokens_to_run())
                .div_ceil(block_size)
                .max(1),
            media_slots: pixels.len(),
            max_seqs: 1,
            max_step_tokens: self.model().context_len().max(1),
            decode_graphs: true,
            prefix_cache: true,
        };
        let mut engine = Engine::new(self, config)?;
        engine.add_request(prompt.clone(), pixels, req)?;
        let mut output = None;
        engine.run_to_completion(|event| match event {
            Event::Text { delta, .. } => on_text(&delta),
            Event::Finished { output: o, .. } => output = Some(Ok(o)),
            Event::Failed { message, .. } => output = Some(Err(Error::Engine(message))),
            Event::Started { .. } | Event::Logprobs { .. } | Event::PromptLogprobs { .. } => {}
        })?;
        output.expect("the engine finishes or fails every request it accepts")
    }
}
