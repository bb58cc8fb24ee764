//! Llama 3.2 Vision through the continuous-batching engine on the CPU backend: 48 mixed requests (text only, one
//! image, two images apart or consecutive) batched together give each request's single-run ids, and every
//! image's vision tower and cross-attention K/V run exactly once (with the media cache, once per picture).

mod common;

use std::collections::{HashMap, HashSet};

use common::fixture_dir;
use flamingo::backend::cpu::CpuBackend;
use flamingo::backend::Backend;
use flamingo::io::image::PreparedImage;
use flamingo::io::prompt::EncodedPrompt;
use flamingo::model::sampling::SamplingParams;
use flamingo::runtime::engine::{Engine, EngineConfig, EngineStats, Event};
use flamingo::runtime::pipeline::Pipeline;
use flamingo::runtime::request::GenerationRequest;

/// Prompts as the processor receives them (BOS added where the text has none) and their image files.
fn prompts() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("<|image|>What is in the cup?", vec!["coffee.png"]),
        ("<|begin_of_text|>Tell me a story about the sea.", vec![]),
        (
            "<|begin_of_text|>First <|image|>then<|image|> compare them.",
            vec!["rocket.jpg", "astronaut.png"],
        ),
        ("<|begin_of_text|><|image|><|image|>Both at once.", vec!["chelsea.png", "coffee.png"]),
        ("Caption this: <|image|>", vec!["astronaut.png"]),
        ("Hello there", vec![]),
    ]
}

struct Case {
    prompt: EncodedPrompt,
    images: Vec<PreparedImage>,
    request: GenerationRequest,
}

fn cases(p: &Pipeline<CpuBackend>, n: usize) -> Vec<Case> {
    let dir = fixture_dir("images");
    let base = prompts();
    (0..n)
        .map(|i| {
            let (text, files) = &base[i % base.len()];
            let paths: Vec<_> = files.iter().map(|f| dir.join(f)).collect();
            let (prompt, images) = p.prepare(text, &paths).unwrap();
            let sampling = if i % 4 == 3 {
                SamplingParams {
                    temperature: 0.7,
                    top_k: 30,
                    seed: i as u64,
                    ..Default::default()
                }
            } else {
                SamplingParams::default()
            };
            Case {
                prompt,
                images,
                request: GenerationRequest {
                    max_new_tokens: 2 + i % 7,
                    sampling,
                    stop: Vec::new(),
                    ignore_eos: true,
                    prompt_logprobs: None,
                },
            }
        })
        .collect()
}

#[test]
fn forty_eight_mixed_requests_batched_match_each_alone_and_encode_each_image_once() {
    let p = Pipeline::load(&fixture_dir("tiny-mllama-b"), CpuBackend::new(), false).unwrap();
    let cases = cases(&p, 48);
    assert!(cases.iter().any(|c| c.prompt.joins_previous.contains(&true)), "a consecutive pair");
    let alone: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            p.generate(&c.prompt, c.images.clone(), &c.request, |_| {})
                .unwrap()
                .generated_ids
        })
        .collect();
    let images: usize = cases.iter().map(|c| c.images.len()).sum();
    // A picture directly after another is seen with it: a media slot of its own.
    let base = prompts();
    let pictures: HashSet<(Option<&str>, &str)> = cases
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            let files = &base[i % base.len()].1;
            let after = |j: usize| c.prompt.joins_previous[j].then(|| files[j - 1]);
            (0..files.len()).map(|j| (after(j), files[j])).collect::<Vec<_>>()
        })
        .collect();
    for (prefix_cache, encoded) in [(false, images), (true, pictures.len())] {
        let (outputs, stats) = run_batched(&p, &cases, prefix_cache);
        for (i, (got, want)) in outputs.iter().zip(&alone).enumerate() {
            assert_eq!(got, want, "request {i} ({:?}) batched vs alone, caches {prefix_cache}", cases[i].prompt.text);
        }
        assert_eq!(stats.preemptions, 0, "the pool holds every request: no recomputation");
        // Once per request's image, or with the media cache once per picture and what it directly follows.
        assert_eq!(stats.images_encoded, encoded, "every image's K/V is computed once, caches {prefix_cache}");
        assert_eq!(stats.recorded_steps, 0, "mllama reads the host layout: decode steps are not replayed");
    }
}

/// Every case batched in one engine; the generated ids in the cases' order and the engine's figures.
fn run_batched(p: &Pipeline<CpuBackend>, cases: &[Case], prefix_cache: bool) -> (Vec<Vec<u32>>, EngineStats) {
    let config = EngineConfig {
        block_size: 8,
        kv_blocks: 512,
        media_slots: 64,
        max_seqs: 16,
        max_step_tokens: 96,
        decode_graphs: true,
        prefix_cache,
    };
    let mut engine = Engine::new(p, config).unwrap();
    let ids: Vec<_> = cases
        .iter()
        .map(|c| engine.add_request(c.prompt.clone(), c.images.clone(), &c.request).unwrap())
        .collect();
    let mut outputs = HashMap::new();
    engine
        .run_to_completion(|e| match e {
            Event::Finished { id, output } => {
                assert!(outputs.insert(id, output.generated_ids).is_none(), "{id} twice");
            }
            Event::Failed { id, message } => panic!("request {id} failed: {message}"),
            Event::Text { .. }
            | Event::Started { .. }
            | Event::Logprobs { .. }
            | Event::PromptLogprobs { .. } => {}
        })
        .unwrap();
    let ordered = ids.iter().map(|id| outputs.remove(id).expect("every request finishes")).collect();
    (ordered, engine.stats())
}

#[test]
fn an_image_changes_the_answer_and_text_only_skips_the_cross_attention() {
    let p = Pipeline::load(&fixture_dir("tiny-mllama-a"), CpuBackend::new(), false).unwrap();
    let dir = fixture_dir("images");
    let vocab = 384;
    let logits = |files: &[&str]| {
        let paths: Vec<_> = files.iter().map(|f| dir.join(f)).collect();
        let (prompt, images) = p.prepare("<|begin_of_text|>Look at <|image|> this.", &paths).unwrap();
        let h = p.prefill(&prompt, &images, None).unwrap();
        p.backend.to_host(&p.logits(&h))
    };
    let (a, b) = (logits(&["coffee.png"]), logits(&["rocket.jpg"]));
    let n = a.len() / vocab;
    assert_ne!(a[(n - 1) * vocab..], b[(n - 1) * vocab..], "the image is seen");
    // Rows before the image see nothing: bit for bit the same whatever the image.
    assert_eq!(a[..vocab], b[..vocab], "the BOS row sees no image");
}
