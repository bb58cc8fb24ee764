//! The run `flamingo profile` measures: a batch of benchmark requests through the engine, prefill then decode
//! steps, each step one profiled span.

use crate::backend::Backend;
use crate::error::Result;
use crate::nvtx;
use crate::perf::bench::{bench_engine, bench_pixels, bench_prompt, bench_request};
use crate::perf::profile::decorator::Profiled;
use crate::runtime::pipeline::Pipeline;

/// Runs `batch` requests (one image and `prompt_tokens` text tokens each) through the engine: once as phase
/// `warm-up`, which takes the costs a server pays once (first-touch page faults of fresh buffers, thread start-up,
/// lazily built state, kernels loaded on first launch) out of the measurement, then `repeats` measured passes: the
/// step that encodes their images and prefills their prompts as phase `prefill`, then `decode_steps` steps as phase
/// `decode`, one span each (the tables keep each op's fastest pass). NVTX ranges name the phases and each decode
/// step for Nsight Systems (the model adds `vision`).
pub fn profile_steps<B: Backend>(p: &Pipeline<Profiled<B>>, workload: &Workload, repeats: usize) -> Result<()> {
    workload.run(p, "warm-up", "warm-up")?;
    (0..repeats).try_for_each(|_| {
        p.backend.next_pass();
        workload.run(p, "prefill", "decode")
    })
}

/// What one pass of a profile runs.
pub struct Workload {
    /// Text tokens per prompt (each prompt also has one image).
    pub prompt_tokens: usize,
    /// Requests prefilled and decoded together.
    pub batch: usize,
    pub decode_steps: usize,
}

impl Workload {
    /// One pass through a fresh engine: its first step as phase `prefill`, each later one as phase `decode`.
    fn run<B: Backend>(&self, p: &Pipeline<Profiled<B>>, prefill: &str, decode: &str) -> Result<()> {
        let prompt = bench_prompt(p, self.prompt_tokens, 0)?;
        let pixels = bench_pixels(p)?;
        let new_tokens = self.decode_steps + 1;
        let mut engine = bench_engine(p, self.batch, prompt.ids.len() + new_tokens, false)?;
        for _ in 0..self.batch {
            engine.add_request(prompt.clone(), vec![pixels.clone()], &bench_request(new_tokens))?;
        }
        let b = &p.backend;
        {
            let _range = nvtx::range(prefill);
            b.phase(prefill, || engine.step())?;
        }
        let _range = nvtx::range(decode);
        (1..=self.decode_steps).try_for_each(|step| {
            let _range = nvtx::range(&format!("{decode} step {step}"));
            b.phase(decode, || engine.step().map(drop))
        })
    }
}
