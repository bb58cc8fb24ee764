//! The continuous-batching engine on the CPU backend: many requests at once give exactly what each gives alone,
//! also when the KV pool is too small for all of them (preemption and recomputation), and under random arrival
//! orders and limits no request is lost or duplicated.

mod common;

use std::collections::HashMap;

use common::fixture_dir;
use common::shared_prefixes::assert_same_outputs as assert_same;
use flamingo::io::image::PreparedImage;
use flamingo::backend::cpu::CpuBackend;
use flamingo::backend::Backend;
use flamingo::model::sampling::SamplingParams;
use flamingo::perf::profile::Profiled;
use flamingo::runtime::engine::{Engine, EngineConfig, EngineStats, Event};
use flamingo::runtime::pipeline::Pipeline;
use flamingo::runtime::request::{GenerationOutput, GenerationRequest};
use flamingo::runtime::scheduler::RequestId;
use rand::{Rng, SeedableRng};

/// Prompts with zero, one and two images, and the image files they take.
fn requests() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            "User:<image>Describe this image.\nAssistant:",
            vec!["chelsea.png"],
        ),
        ("<image>What is in the cup?", vec!["coffee.png"]),
        ("Question: How many animals are there? Answer:", vec![]),
        (
            "<image>And this one?<image>Compare them.",
            vec!["rocket.jpg", "astronaut.png"],
        ),
        ("Caption:<image>", vec!["astronaut.png"]),
    ]
}

struct Case {
    prompt: flamingo::io::prompt::EncodedPrompt,
    pixels: Vec<PreparedImage>,
    request: GenerationRequest,
}

/// `n` requests cycling through the prompts, with varied lengths; every third one sampled with its own seed.
fn cases<B: Backend>(p: &Pipeline<B>, n: usize) -> Vec<Case> {
    let images = fixture_dir("images");
    let base = requests();
    (0..n)
        .map(|i| {
            let (text, files) = &base[i % base.len()];
            let paths: Vec<_> = files.iter().map(|f| images.join(f)).collect();
            let (prompt, pixels) = p.prepare(text, &paths).unwrap();
            let mut sampling = if i % 3 == 2 {
                SamplingParams {
                    temperature: 0.8,
                    top_k: 20,
                    top_p: 0.9,
                    seed: i as u64,
                    ..Default::default()
                }
            } else {
                SamplingParams::default()
            };
            // Every fourth asks for log-probabilities, some with OpenAI's penalties and a bias.
            if i % 4 == 1 {
                sampling.logprobs = Some(i % 6);
                sampling.frequency_penalty = 0.4;
                sampling.presence_penalty = 0.3;
                sampling.logit_bias = vec![(5, 1.5), (40, -2.0)];
            }
            Case {
                prompt,
                pixels,
                request: GenerationRequest {
                    max_new_tokens: if i % 10 == 8 { 0 } else { 3 + i % 9 },
                    sampling,
                    stop: Vec::new(),
                    ignore_eos: false,
                    // Every fifth scores its prompt; one in ten of those asks for nothing new (scores only).
                    prompt_logprobs: (i % 5 == 3).then_some(i % 3),
                },
            }
        })
        .collect()
}

/// `n` cases, what each gives alone, and the most positions one of them needs.
fn cases_alone_and_longest(
    p: &Pipeline<CpuBackend>,
    n: usize,
) -> (Vec<Case>, Vec<GenerationOutput>, usize) {
    let cases = cases(p, n);
    let alone = cases.iter().map(|c| solo(p, c)).collect();
    let longest = cases
        .iter()
        .map(|c| c.prompt.ids.len() + c.request.max_new_tokens)
        .max()
        .unwrap();
    (cases, alone, longest)
}

fn solo(p: &Pipeline<CpuBackend>, c: &Case) -> GenerationOutput {
    p.generate(&c.prompt, c.pixels.clone(), &c.request, |_| {})
        .unwrap()
}

/// Runs every case through one engine, adding them `arrivals` at a time between steps (all at once when None),
/// and returns each request's output and the text streamed for it.
fn run_engine<B: Backend>(
    p: &Pipeline<B>,
    config: EngineConfig,
    cases: &[Case],
    rng: Option<&mut rand::rngs::StdRng>,
) -> (Vec<GenerationOutput>, EngineStats) {
    let mut engine = Engine::new(p, config).unwrap();
    let mut ids: Vec<RequestId> = Vec::new();
    let mut outputs: HashMap<RequestId, GenerationOutput> = HashMap::new();
    let mut streamed: HashMap<RequestId, String> = HashMap::new();
    let mut on_event = |e: Event| match e {
        Event::Text { id, delta } => streamed.entry(id).or_default().push_str(&delta),
        Event::Finished { id, output } => {
            assert!(
                outputs.insert(id, output).is_none(),
                "request {id} finished twice"
            );
        }
        Event::Failed { id, message } => panic!("request {id} failed: {message}"),
        Event::Started { .. } | Event::Logprobs { .. } | Event::PromptLogprobs { .. } => {}
    };
    match rng {
        None => {
            for c in cases {
                ids.push(
                    engine
                        .add_request(c.prompt.clone(), c.pixels.clone(), &c.request)
                        .unwrap(),
                );
            }
            engine.run_to_completion(&mut on_event).unwrap();
        }
        Some(rng) => {
            let mut next = 0;
            while next < cases.len() || engine.pending_requests() > 0 {
                let arrivals = rng.random_range(0..=3).min(cases.len() - next);
                for c in &cases[next..next + arrivals] {
                    ids.push(
                        engine
                            .add_request(c.prompt.clone(), c.pixels.clone(), &c.request)
                            .unwrap(),
                    );
                }
                next += arrivals;
                for e in engine.step().unwrap() {
                    on_event(e);
                }
            }
        }
    }
    assert_eq!(outputs.len(), cases.len(), "requests lost");
    let stats = engine.stats();
    let ordered = ids
        .iter()
        .map(|id| {
            let out = outputs.remove(id).expect("every request finishes");
            assert_eq!(
                streamed.remove(id).unwrap_or_default(),
                out.text,
                "streamed text"
            );
            out
        })
        .collect();
    (ordered, stats)
}

#[test]
fn sixty_four_requests_batched_give_what_each_gives_alone() {
    for name in ["tiny-idefics-a", "tiny-idefics-b"] {
        let p = Pipeline::load(&fixture_dir(name), CpuBackend::new(), false).unwrap();
        let cases = cases(&p, 64);
        let alone: Vec<_> = cases.iter().map(|c| solo(&p, c)).collect();
        let config = EngineConfig {
            block_size: 16,
            kv_blocks: 64 * 4,
            media_slots: 128,
            max_seqs: 64,
            max_step_tokens: 512,
            decode_graphs: true,
            prefix_cache: true,
        };
        let (batched, stats) = run_engine(&p, config, &cases, None);
        assert_eq!(stats.preemptions, 0, "{name}: the pool was big enough");
        assert_same(name, &batched, &alone);
    }
}

/// The engine pads a decode step to its batch size's recording (CUDA graphs) with rows on the KV cache's padding
/// block. `Profiled` runs "recorded" steps eagerly, so the padding is checked here on the CPU: every request gives
/// exactly what it gives through an engine that never pads, while the batch shrinks through several sizes.
#[test]
fn padded_decode_steps_give_the_tokens_of_unpadded_ones() {
    let dir = fixture_dir("tiny-idefics-a");
    let plain = Pipeline::load(&dir, CpuBackend::new(), false).unwrap();
    let padding = Pipeline::load(&dir, Profiled::new(CpuBackend::new()), false).unwrap();
    // 13 requests long enough that a padding row writing where it must not shows in some request's tokens; then
    // 70 short ones, padded to 128.
    for (n, tokens) in [(13, 12..), (70, 3..)] {
        let mut cases = cases(&plain, n);
        for (c, t) in cases.iter_mut().zip(tokens.step_by(3)) {
            c.request.max_new_tokens = t.min(12 + 3 * 12);
            c.request.ignore_eos = true;
        }
        let config = EngineConfig {
            block_size: 4,
            kv_blocks: n * 24,
            media_slots: 2 * n,
            max_seqs: n,
            max_step_tokens: 1024,
            decode_graphs: true,
            prefix_cache: true,
        };
        let (want, unpadded) = run_engine(&plain, config.clone(), &cases, None);
        let (got, padded) = run_engine(&padding, config, &cases, None);
        assert_eq!(
            unpadded.recorded_steps, 0,
            "the CPU backend records nothing"
        );
        assert!(padded.recorded_steps > 3, "{n} requests: {padded:?}");
        assert_same(&format!("padded, {n} requests"), &got, &want);
    }
}

#[test]
fn a_kv_pool_too_small_for_all_forces_preemption_and_changes_nothing() {
    let p = Pipeline::load(&fixture_dir("tiny-idefics-a"), CpuBackend::new(), false).unwrap();
    let (cases, alone, longest) = cases_alone_and_longest(&p, 64);
    let config = EngineConfig {
        block_size: 4,
        // Room for about three of the longest requests at once.
        kv_blocks: 3 * longest.div_ceil(4),
        media_slots: 16,
        max_seqs: 32,
        max_step_tokens: 64,
        decode_graphs: true,
        prefix_cache: true,
    };
    let (batched, stats) = run_engine(&p, config, &cases, None);
    assert!(stats.preemptions > 0, "the pool was meant to run dry");
    assert_same("small pool", &batched, &alone);
}

#[test]
fn random_arrivals_and_limits_lose_or_duplicate_nothing() {
    let p = Pipeline::load(&fixture_dir("tiny-idefics-a"), CpuBackend::new(), false).unwrap();
    let (cases, alone, longest) = cases_alone_and_longest(&p, 24);
    for seed in 0..6 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let block_size = rng.random_range(1..=8);
        let config = EngineConfig {
            block_size,
            kv_blocks: longest.div_ceil(block_size) * rng.random_range(1..=4),
            media_slots: rng.random_range(2..=8),
            max_seqs: rng.random_range(1..=8),
            max_step_tokens: rng.random_range(1..=48),
            decode_graphs: true,
            prefix_cache: true,
        };
        let (got, _) = run_engine(&p, config.clone(), &cases, Some(&mut rng));
        assert_same(&format!("seed {seed} {config:?}"), &got, &alone);
    }
}

#[test]
fn requests_the_engine_could_never_run_are_refused_up_front() {
    let p = Pipeline::load(&fixture_dir("tiny-idefics-a"), CpuBackend::new(), false).unwrap();
    let case = &cases(&p, 4)[3]; // two images
    let config = EngineConfig {
        block_size: 4,
        kv_blocks: 2,
        media_slots: 1,
        max_seqs: 4,
        max_step_tokens: 64,
        decode_graphs: true,
        prefix_cache: true,
    };
    let mut engine = Engine::new(&p, config).unwrap();
    let err = engine
        .add_request(case.prompt.clone(), case.pixels.clone(), &case.request)
        .unwrap_err()
        .to_string();
    assert!(err.contains("media cache"), "{err}");
    let mut engine = Engine::new(
        &p,
        EngineConfig {
            media_slots: 4,
            ..engine.config().clone()
        },
    )
    .unwrap();
    let err = engine
        .add_request(case.prompt.clone(), case.pixels.clone(), &case.request)
        .unwrap_err()
        .to_string();
    assert!(err.contains("KV blocks"), "{err}");
    let err = engine
        .add_request(case.prompt.clone(), vec![], &case.request)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 image tokens but 0 images"), "{err}");
    assert_eq!(engine.pending_requests(), 0);
}

/// Requests forked from a shared prefix (`n` seeded choices of one prompt, and candidates scored after it) give
/// exactly what each gives alone, also when the pool is so small that forks are preempted and recomputed; the
/// prefix's image is encoded once for all of them and its full blocks are not recomputed.
#[test]
fn requests_forked_from_a_shared_prefix_give_what_each_gives_alone() {
    use flamingo::runtime::engine::ForkedRequest;
    let p = Pipeline::load(&fixture_dir("tiny-idefics-a"), CpuBackend::new(), false).unwrap();
    let image = [fixture_dir("images").join("chelsea.png")];
    let text = "User:<image>Describe this image in a few words, please.\nAssistant:";
    let (prefix, pixels) = p.prepare(text, &image).unwrap();
    let mut children = Vec::new();
    for i in 0..3u64 {
        let sampling = SamplingParams {
            temperature: 0.9,
            seed: 40 + i,
            logprobs: Some(2),
            ..Default::default()
        };
        let request = GenerationRequest { max_new_tokens: 6, sampling, ..Default::default() };
        children.push(ForkedRequest { prompt: prefix.clone(), request, scored_from: 1 });
    }
    for candidate in [" a cat", " a tabby cat on a rug", " two dogs", " a"] {
        let (full, _) = p.prepare(&format!("{text}{candidate}"), &image).unwrap();
        let request = GenerationRequest {
            max_new_tokens: 0,
            prompt_logprobs: Some(1),
            ..Default::default()
        };
        children.push(ForkedRequest { prompt: full, request, scored_from: prefix.ids.len() });
    }
    let alone: Vec<GenerationOutput> = children
        .iter()
        .map(|c| p.generate(&c.prompt, pixels.clone(), &c.request, |_| {}).unwrap())
        .collect();
    for (kv_blocks, max_seqs) in [(64, 8), (16, 4)] {
        let config = EngineConfig {
            block_size: 4,
            kv_blocks,
            media_slots: 4,
            max_seqs,
            max_step_tokens: 24,
            decode_graphs: true,
            prefix_cache: true,
        };
        let mut engine = Engine::new(&p, config).unwrap();
        let ids = engine.add_forked(prefix.clone(), pixels.clone(), children.clone()).unwrap();
        let mut outputs = HashMap::new();
        // Bounded: a scheduler that stalls (blocks held by sequences that cannot run) fails here, not by hanging.
        for _ in 0..2000 {
            if engine.pending_requests() == 0 {
                break;
            }
            for e in engine.step().unwrap() {
                match e {
                    Event::Finished { id, output } => assert!(outputs.insert(id, output).is_none()),
                    Event::Failed { message, .. } => panic!("{message}"),
                    _ => {}
                }
            }
        }
        assert_eq!(engine.pending_requests(), 0, "the engine stalled ({kv_blocks} blocks)");
        let stats = engine.stats();
        assert_eq!(stats.images_encoded, 1, "the prefix's image, once");
        assert!(stats.shared_prefix_rows >= 7 * 4 * (prefix.ids.len() / 4 - 1));
        if kv_blocks == 16 {
            assert!(stats.preemptions > 0, "the small pool was meant to preempt");
        }
        assert_eq!(outputs.len(), ids.len(), "every fork finishes once");
        for (i, (id, want)) in ids.iter().zip(&alone).enumerate() {
            let got = &outputs[id];
            assert_eq!(got.generated_ids, want.generated_ids, "fork {i} ({kv_blocks} blocks)");
            assert_eq!(got.logprobs, want.logprobs, "fork {i}");
            let skip = children[i].scored_from - 1;
            assert_eq!(got.prompt_logprobs, want.prompt_logprobs[skip.min(want.prompt_logprobs.len())..], "fork {i}");
        }
        let distinct: std::collections::HashSet<_> =
            ids[..3].iter().map(|id| outputs[id].generated_ids.clone()).collect();
        assert!(distinct.len() > 1, "seeded choices differ");
    }
}
