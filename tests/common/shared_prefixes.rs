//! A workload of requests drawn from a few shared few-shot prefixes and images (some differing in one pixel), run
//! through one engine with requests arriving between steps, for the prefix-cache tests on both backends.

use std::collections::HashMap;

use flamingo::backend::Backend;
use flamingo::io::image::PreparedImage;
use flamingo::io::prompt::EncodedPrompt;
use flamingo::model::sampling::SamplingParams;
use flamingo::runtime::engine::{Engine, EngineConfig, EngineStats, Event};
use flamingo::runtime::pipeline::Pipeline;
use flamingo::runtime::request::{GenerationOutput, GenerationRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub struct Case {
    pub prompt: EncodedPrompt,
    pub pixels: Vec<PreparedImage>,
    pub request: GenerationRequest,
}

/// `base`; the same picture with one value of one pixel nudged (by more than a bf16 step); a darker one; that one
/// nudged; and one upside down.
pub fn image_variants(base: &PreparedImage) -> Vec<PreparedImage> {
    let nudged = |image: &PreparedImage| {
        let mut one_pixel = image.clone();
        one_pixel.pixels[37] += 1.0 / 64.0;
        one_pixel
    };
    let darker = PreparedImage { pixels: base.pixels.iter().map(|v| 0.5 * v - 0.25).collect(), ..base.clone() };
    let flipped = PreparedImage { pixels: base.pixels.iter().rev().copied().collect(), ..base.clone() };
    vec![base.clone(), nudged(base), nudged(&darker), darker, flipped]
}

/// `n` requests: a few-shot prefix (support pictures with captions, or text only) out of three, then a query
/// picture out of `images` and a question; greedy or seeded, some asking for logprobs or scoring their prompt.
pub fn shared_prefix_cases<B: Backend>(p: &Pipeline<B>, images: &[PreparedImage], n: usize, seed: u64) -> Vec<Case> {
    let prefixes: [(&str, Vec<usize>); 3] = [
        ("<image>Caption: a small cat on a mat.\n<image>Caption: two brown dogs.\n", vec![0, 2]),
        ("Question: what is shown in the picture? Answer briefly.\n", vec![]),
        ("<image>Caption: a red car.\n", vec![1]),
    ];
    let questions = ["Caption:", "Question: what colour is it? Answer:", "Caption: a"];
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let (prefix, support) = &prefixes[rng.random_range(0..prefixes.len())];
            let query = rng.random_range(0..images.len());
            let text = format!("{prefix}<image>{}", questions[rng.random_range(0..questions.len())]);
            let prompt = p.prompt_for(&text, support.len() + 1).unwrap();
            let pixels = support.iter().chain([&query]).map(|&j| images[j].clone()).collect();
            let mut sampling = match rng.random_range(0..3) {
                0 => SamplingParams { temperature: 0.9, top_k: 30, top_p: 0.95, seed: i as u64, ..Default::default() },
                _ => SamplingParams::default(),
            };
            if rng.random_range(0..5) == 0 {
                sampling.logprobs = Some(2);
            }
            Case {
                prompt,
                pixels,
                request: GenerationRequest {
                    max_new_tokens: rng.random_range(1..=6),
                    sampling,
                    stop: Vec::new(),
                    ignore_eos: rng.random_range(0..2) == 0,
                    prompt_logprobs: (rng.random_range(0..8) == 0).then_some(1),
                },
            }
        })
        .collect()
}

/// Runs `cases` through one engine, 0 to 3 arriving before each step (the same arrivals for a given `seed`);
/// returns every output in case order and the engine's stats. Fails if a request fails, finishes twice, is lost,
/// or the engine stops making progress.
pub fn run_interleaved<B: Backend>(
    p: &Pipeline<B>,
    config: EngineConfig,
    cases: &[Case],
    seed: u64,
) -> (Vec<GenerationOutput>, EngineStats) {
    let mut engine = Engine::new(p, config).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = Vec::new();
    let mut outputs = HashMap::new();
    let (mut next, mut steps) = (0, 0);
    while next < cases.len() || engine.pending_requests() > 0 {
        steps += 1;
        assert!(steps < 100 * cases.len(), "the engine stalled");
        let arrivals = rng.random_range(0..=3).min(cases.len() - next);
        for c in &cases[next..next + arrivals] {
            ids.push(engine.add_request(c.prompt.clone(), c.pixels.clone(), &c.request).unwrap());
        }
        next += arrivals;
        for e in engine.step().unwrap() {
            match e {
                Event::Finished { id, output } => {
                    assert!(outputs.insert(id, output).is_none(), "request {id} finished twice")
                }
                Event::Failed { id, message } => panic!("request {id} failed: {message}"),
                _ => {}
            }
        }
    }
    let ordered = ids.iter().map(|id| outputs.remove(id).expect("every request finishes")).collect();
    (ordered, engine.stats())
}

/// Asserts two runs' outputs are the same bits: ids, text, finish reasons, logprobs.
pub fn assert_same_outputs(what: &str, got: &[GenerationOutput], want: &[GenerationOutput]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.generated_ids, w.generated_ids, "{what}: request {i} ids");
        assert_eq!(g.text, w.text, "{what}: request {i} text");
        assert_eq!(g.finish_reason, w.finish_reason, "{what}: request {i} finish");
        assert_eq!(g.logprobs, w.logprobs, "{what}: request {i} logprobs");
        assert_eq!(g.prompt_logprobs, w.prompt_logprobs, "{what}: request {i} prompt logprobs");
    }
}

/// An engine small enough that 200 of these requests preempt and evict: 8 sequences, a KV pool of `kv_blocks`
/// blocks of 4 positions, 4 image slots, 24 rows a step (prompts run in chunks).
pub fn tight_config(kv_blocks: usize, prefix_cache: bool) -> EngineConfig {
    EngineConfig {
        block_size: 4,
        kv_blocks,
        media_slots: 4,
        max_seqs: 8,
        max_step_tokens: 24,
        decode_graphs: true,
        prefix_cache,
    }
}
