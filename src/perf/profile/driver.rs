//! The run `flamingo profile` measures: a batch of benchmark requests through the engine, prefill then decode
//! steps, each step one profiled span.

use crate::backend::Backend;
use crate::error::Result;
use crate::nvtx;
use crate::perf::bench::{bench_engine, bench_pixels, bench_prompt, bench_request};
use crate::perf::profile::decorator::Profiled;
use crate::runtime::pipeline::Pipeline;

/// Runs `batch` requests (one image and `prompt_tokens` text tokens each) through the engine: the step that encodes
/// their images and prefills their prompts as phase `prefill`, then `decode_steps` steps as phase `decode`, one
/// span each. NVTX ranges name the phases and each decode step for Nsight Systems (the model adds `vision`).
pub fn profile_steps<B: Backend>(
    p: &Pipeline<Profiled<B>>,
    prompt_tokens: usize,
    batch: usize,
    decode_steps: usize,
) -> Result<()> {
    let prompt = bench_prompt(p, prompt_tokens, 0)?;
    let pixels = bench_pixels(p)?;
    let new_tokens = decode_steps + 1;
    let mut engine = bench_engine(p, batch, prompt.ids.len() + new_tokens, false)?;
    for _ in 0..batch {
        engine.add_request(
            prompt.clone(),
            vec![pixels.clone()],
            &bench_request(new_tokens),
        )?;
    }
    let b = &p.backend;
    {
        let _range = nvtx::range("prefill");
        b.phase("prefill", || engine.step())?;
    }
    let _range = nvtx::range("decode");
    (1..=decode_steps).try_for_each(|step| {
        let _range = nvtx::range(&format!("decode step {step}"));
        b.phase("decode", || engine.step().map(drop))
    })
}
