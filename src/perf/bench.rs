//! `flamingo bench`'s measurements: end-to-end latency and throughput through the continuous-batching engine, each
//! beside its roofline floor (`perf::floors`) computed from ceilings measured in the same run.
//!
//! Every request is one image plus `prompt_tokens` text tokens (random ids, fixed seed) and generates exactly its
//! `new_tokens` (end-of-sequence ignored), so every run does the same work whatever the weights. These workloads
//! run with the prefix cache off (they repeat one prompt to time its computation).
//!
//! The few-shot workload is the in-context evaluation Flamingo models are used for: `k` support pictures with
//! their captions, then a query picture, many queries behind one support set. It runs twice side by side, with the
//! prefix and media caches and without, each engine warmed by one query: time to first token of a query alone,
//! and throughput of all queries at once.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backend::{Backend, Ceilings};
use crate::error::Result;
use crate::io::image::PreparedImage;
use crate::io::openflamingo_config::DecoderConfig;
use crate::io::prompt::{encode_prompt, EncodedPrompt};
use crate::model::openflamingo::OpenFlamingo;
use crate::model::Model;
use crate::perf::floors::{Costs, Floors, MllamaCosts, OpenFlamingoCosts, OpenFlamingoDims};
use crate::runtime::engine::{Engine, EngineConfig, Event};
use crate::runtime::pipeline::{Family, Pipeline};
use crate::runtime::request::GenerationRequest;

/// What to measure; the defaults are the published-anchor workloads (`shared/docs/perf-anchors.md`).
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Text tokens per prompt, after the image.
    pub prompt_tokens: usize,
    /// Tokens each request generates in the throughput runs.
    pub new_tokens: usize,
    /// Concurrent requests of each throughput run.
    pub concurrency: Vec<usize>,
    /// Tokens timed for the batch-1 decode figure.
    pub decode_tokens: usize,
    /// Images timed for the vision encoder figure.
    pub vision_images: usize,
    /// Timed repetitions of the time-to-first-token and image figures (the median is reported).
    pub repeats: usize,
    /// Whether decode steps replay recordings (CUDA graphs) where the backend has them.
    pub decode_graphs: bool,
    /// Support pictures of each few-shot workload (none: no few-shot figures).
    pub shots: Vec<usize>,
    /// Queries behind each few-shot workload's support set.
    pub few_shot_queries: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prompt_tokens: 64,
            new_tokens: 128,
            concurrency: vec![8, 32, 128],
            decode_tokens: 64,
            vision_images: 16,
            repeats: 5,
            decode_graphs: true,
            shots: vec![4, 8],
            few_shot_queries: 16,
        }
    }
}

/// A measured figure beside its floor. `fraction` is floor over measured for times and measured over floor for
/// rates: the share of the hardware's best that was reached (1 = at the roofline).
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub value: f64,
    pub floor: f64,
    pub fraction: f64,
    pub unit: &'static str,
}

impl Figure {
    fn time(seconds: f64, floor_seconds: f64) -> Self {
        Figure {
            value: seconds * 1e3,
            floor: floor_seconds * 1e3,
            fraction: floor_seconds / seconds,
            unit: "ms",
        }
    }

    fn rate(value: f64, ceiling: f64, unit: &'static str) -> Self {
        Figure {
            value,
            floor: ceiling,
            fraction: value / ceiling,
            unit,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub concurrency: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    /// Generated tokens per second over the whole run (prefills included), beside the roofline's.
    pub output_tokens_per_s: Figure,
}

#[derive(Clone, Debug, Serialize)]
pub struct CeilingsReport {
    pub copy_gb_per_s: f64,
    pub matmul_gflop_per_s: f64,
    pub method: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub params: f64,
    pub weight_gb: f64,
    /// Weights a decode step reads.
    pub decode_weight_gb: f64,
    pub ceilings: CeilingsReport,
    /// Tokens per prompt, image tokens included.
    pub prompt_tokens: usize,
    /// 1 image + the prompt, to the first generated token.
    pub time_to_first_token: Figure,
    /// Per generated token, one request.
    pub decode_batch1: Figure,
    /// Vision encoder and resampler, one image.
    pub image_encode: Figure,
    pub vision_images_per_s: Figure,
    pub throughput: Vec<Throughput>,
    /// Whether decode steps replayed recordings (CUDA graphs): asked for, and the backend records.
    pub decode_graphs: bool,
    pub few_shot: Vec<FewShotReport>,
}

/// One few-shot workload, with the caches and without, and how they compare.
#[derive(Clone, Debug, Serialize)]
pub struct FewShotReport {
    pub shots: usize,
    pub queries: usize,
    /// Tokens per query prompt, image tokens included.
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub cached: FewShotRun,
    pub uncached: FewShotRun,
    /// Time to first token without the caches over with them.
    pub ttft_speedup: f64,
    /// Throughput with the caches over without them.
    pub throughput_speedup: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FewShotRun {
    /// Median over the queries, each alone behind the (warm) support set.
    pub time_to_first_token_ms: f64,
    /// All queries at once.
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Prompt rows found in the prefix cache, of the rows admitted requests had to compute.
    pub prefix_hit_rate: f64,
    /// Images found in the media cache, of the images of admitted requests.
    pub media_hit_rate: f64,
    pub prefill_rows_saved: usize,
    pub images_encoded: usize,
}

/// A benchmark request: the family's prompt of one image followed by random text ids (below the special tokens).
pub fn bench_prompt<B: Backend>(
    p: &Pipeline<B>,
    text_tokens: usize,
    seed: u64,
) -> Result<EncodedPrompt> {
    let (mut prompt, vocab) = match &p.family {
        Family::Idefics(m) => (encode_prompt(&p.tokenizer, "<image>", 1)?, m.config.vocab_size as u32),
        // Llama 3's special tokens start at <|begin_of_text|>.
        Family::Mllama(_) => (p.prompt_for("<|image|>", 1)?, p.tokenizer.bos_id),
        // OpenFlamingo's added tokens (`<|endofchunk|>` first) follow the language model's own.
        Family::OpenFlamingo(_) => (p.prompt_for("<image>", 1)?, p.tokenizer.eos_id),
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let specials = &p.tokenizer.banned_ids;
    let image = *prompt
        .image_of_token
        .last()
        .expect("the prompt has the image");
    while prompt.ids.len() < prompt.image_of_token.len() + text_tokens {
        let id = rng.random_range(3..vocab.max(4));
        if !specials.contains(&id) {
            prompt.ids.push(id);
        }
    }
    prompt.image_of_token.resize(prompt.ids.len(), image);
    p.check_prompt(&prompt)?;
    Ok(prompt)
}

/// One image's pixels, random in the normalised range (fixed seed): IDEFICS `[3, S, S]`; Llama 3.2 Vision every
/// tile slot used (`max_num_tiles` tiles of `[3, S, S]`, the most work an image makes).
pub fn bench_pixels<B: Backend>(p: &Pipeline<B>) -> Result<PreparedImage> {
    let (s, tiles, slots) = match &p.family {
        Family::Idefics(m) => (m.config.vision_config.image_size, (1, 1), 1),
        Family::OpenFlamingo(m) => (m.vision.vision.image_size, (1, 1), 1),
        Family::Mllama(m) => {
            let v = &m.config.vision_config;
            let grid = *v
                .supported_aspect_ratios
                .iter()
                .filter(|(h, w)| h * w <= v.max_num_tiles)
                .max_by_key(|(h, w)| h * w)
                .unwrap_or(&(1, 1));
            (v.image_size, grid, v.max_num_tiles)
        }
    };
    let mut rng = StdRng::seed_from_u64(7);
    Ok(PreparedImage {
        pixels: (0..slots * 3 * s * s).map(|_| rng.random_range(-1.8..2.1)).collect(),
        tiles,
    })
}

/// The family's roofline accounting.
fn floors<'p, B: Backend>(p: &'p Pipeline<B>, weight_bytes: f64) -> Box<dyn Floors + 'p> {
    let kv = p.backend.activation_width() as f64;
    match &p.family {
        Family::Idefics(m) => Box::new(Costs::new(&m.config, weight_bytes, kv)),
        Family::Mllama(m) => Box::new(MllamaCosts::new(&m.config, weight_bytes, kv)),
        Family::OpenFlamingo(m) => Box::new(OpenFlamingoCosts::new(openflamingo_dims(m), weight_bytes, kv)),
    }
}

/// What OpenFlamingo's accounting needs of a loaded model (the gated blocks and vocabulary are the checkpoint's).
fn openflamingo_dims<B: Backend>(m: &OpenFlamingo<B>) -> OpenFlamingoDims {
    let (width, layers, mlp, tied_head) = match &m.decoder {
        DecoderConfig::Mpt(c) => (c.d_model, c.n_layers, c.mlp_width, true),
        DecoderConfig::GptNeox(c) => (c.hidden_size, c.num_hidden_layers, c.intermediate_size, false),
    };
    let v = &m.vision.vision;
    OpenFlamingoDims {
        width,
        layers,
        mlp,
        cross_blocks: m.media_layout().0,
        vocab: m.vocab_rows(),
        tied_head,
        vision_width: v.width,
        vision_layers: v.layers,
        vision_mlp: v.mlp_width(),
        patch_size: v.patch_size,
        patch_tokens: v.patch_tokens(),
    }
}

/// The vision tower alone on one image (IDEFICS: without the resampler; Llama 3.2 Vision: without the projector).
fn vision_only<B: Backend>(p: &Pipeline<B>, image: &PreparedImage) -> Result<()> {
    match &p.family {
        Family::Idefics(m) => drop(m.vision_states(&p.backend, &image.pixels)),
        Family::Mllama(m) => drop(m.vision_model.forward(&p.backend, image)?),
        Family::OpenFlamingo(m) => drop(m.media().vision_tokens(&p.backend, &image.pixels)),
    }
    Ok(())
}

/// Runs every measurement; `progress` hears what is being measured.
pub fn run<B: Backend>(
    p: &Pipeline<B>,
    opts: &BenchOptions,
    model_name: &str,
    mut progress: impl FnMut(&str),
) -> Result<BenchReport> {
    let b = &p.backend;
    progress("measuring the ceilings");
    let ceilings = b.measure_ceilings();
    let weight_bytes = p.store.bytes_as(|d| b.weight_width(d)) as f64;
    let costs = floors(p, weight_bytes / p.store.params() as f64);
    let prompt = bench_prompt(p, opts.prompt_tokens, 0)?;
    let pixels = bench_pixels(p)?;
    let n = prompt.ids.len();

    progress("vision encoder");
    let image_floor = costs.image_floor(&ceilings);
    let image_s = median(opts.repeats, || {
        Ok(time(b, || p.encode_images(&[pixels.clone()])))
    })?;
    // Once untimed: a warm-up, and the check that the tower takes the image (then the timed runs cannot fail).
    vision_only(p, &pixels)?;
    let vision_s = time(b, || {
        (0..opts.vision_images)
            .map(|_| vision_only(p, &pixels))
            .collect::<Result<Vec<()>>>()
    }) / opts.vision_images.max(1) as f64;

    progress("time to first token");
    let ttft_floor = image_floor + costs.prefill(n).floor(&ceilings);
    let ttft = median(opts.repeats, || {
        Ok(generate(p, opts, &prompt, &pixels, 1, 1)?.0)
    })?;

    progress("decode at batch 1");
    let decode = decode_seconds_per_token(p, opts, &prompt, &pixels)?;
    let decode_floor = costs
        .decode_step(1, n + opts.decode_tokens / 2)
        .floor(&ceilings);

    let mut throughput = Vec::new();
    for &c in &opts.concurrency {
        progress(&format!("throughput at {c} concurrent requests"));
        let (seconds, tokens) = generate(p, opts, &prompt, &pixels, c, opts.new_tokens)?;
        let floor = throughput_floor(costs.as_ref(), &ceilings, c, n, opts.new_tokens);
        throughput.push(Throughput {
            concurrency: c,
            new_tokens: opts.new_tokens,
            seconds,
            output_tokens_per_s: Figure::rate(
                tokens as f64 / seconds,
                (c * opts.new_tokens) as f64 / floor,
                "tokens/s",
            ),
        });
    }
    Ok(BenchReport {
        model: model_name.to_string(),
        device: b.device_name(),
        params: costs.total_params(),
        weight_gb: weight_bytes / 1e9,
        decode_weight_gb: costs.decode_params() * costs.weight_bytes() / 1e9,
        ceilings: CeilingsReport {
            copy_gb_per_s: ceilings.copy_bytes_per_s / 1e9,
            matmul_gflop_per_s: ceilings.matmul_flops_per_s / 1e9,
            method: ceilings.method.clone(),
        },
        prompt_tokens: n,
        time_to_first_token: Figure::time(ttft, ttft_floor),
        decode_batch1: Figure::time(decode, decode_floor),
        image_encode: Figure::time(image_s, image_floor),
        vision_images_per_s: Figure::rate(
            1.0 / vision_s,
            1.0 / costs.vision().floor(&ceilings),
            "images/s",
        ),
        throughput,
        decode_graphs: opts.decode_graphs && b.new_step_graphs(p.model().head_dim()).is_some(),
        few_shot: opts
            .shots
            .iter()
            .filter(|_| opts.few_shot_queries > 0)
            .map(|&k| {
                progress(&format!("{k}-shot, with the caches and without"));
                few_shot(p, opts, k)
            })
            .collect::<Result<_>>()?,
    })
}

/// `k` support pictures with captions, then a query picture: the family's image marker and plain text (OpenFlamingo:
/// each example closed by `<|endofchunk|>`, as its evaluation prompts are).
fn few_shot_text<B: Backend>(p: &Pipeline<B>, k: usize) -> String {
    let (marker, end) = match &p.family {
        Family::Idefics(_) => ("<image>", "\n"),
        Family::Mllama(_) => ("<|image|>", "\n"),
        Family::OpenFlamingo(_) => ("<image>", "<|endofchunk|>"),
    };
    let mut text: String = (0..k)
        .map(|i| format!("{marker}Caption: a photograph of the object numbered {i}, seen from the side.{end}"))
        .collect();
    text += &format!("{marker}Caption:");
    text
}

/// A picture for the few-shot workloads, random in the normalised range from `seed`, shaped as `bench_pixels`.
fn picture<B: Backend>(p: &Pipeline<B>, seed: u64) -> Result<PreparedImage> {
    let mut image = bench_pixels(p)?;
    let mut rng = StdRng::seed_from_u64(seed);
    image.pixels.iter_mut().for_each(|v| *v = rng.random_range(-1.8..2.1));
    Ok(image)
}

/// The `k`-shot workload with the caches and without, side by side.
fn few_shot<B: Backend>(p: &Pipeline<B>, opts: &BenchOptions, k: usize) -> Result<FewShotReport> {
    let prompt = p.prompt_for(&few_shot_text(p, k), k + 1)?;
    p.check_prompt(&prompt)?;
    let support: Vec<PreparedImage> = (0..k as u64).map(|i| picture(p, 100 + i)).collect::<Result<_>>()?;
    // Query pictures never seen before: one to warm the engine, a set timed alone, another all at once.
    let queries = |first_seed: u64, n: usize| -> Result<Vec<Vec<PreparedImage>>> {
        (0..n as u64)
            .map(|q| {
                let mut images = support.clone();
                images.push(picture(p, first_seed + q)?);
                Ok(images)
            })
            .collect()
    };
    let n = opts.few_shot_queries;
    let queries = [queries(3000, 1)?, queries(1000, n)?, queries(2000, n)?];
    let new_tokens = opts.new_tokens.min(16);
    let uncached = few_shot_run(p, opts, &prompt, &queries, new_tokens, false)?;
    let cached = few_shot_run(p, opts, &prompt, &queries, new_tokens, true)?;
    Ok(FewShotReport {
        shots: k,
        queries: opts.few_shot_queries,
        prompt_tokens: prompt.ids.len(),
        new_tokens,
        ttft_speedup: uncached.time_to_first_token_ms / cached.time_to_first_token_ms,
        throughput_speedup: cached.requests_per_s / uncached.requests_per_s,
        cached,
        uncached,
    })
}

/// One engine (caches on or off) warmed by the `warm` queries: each query of `alone` by itself to its first
/// token, then all of `together` at once generating `new_tokens` each.
fn few_shot_run<B: Backend>(
    p: &Pipeline<B>,
    opts: &BenchOptions,
    prompt: &EncodedPrompt,
    [warm, alone, together]: &[Vec<Vec<PreparedImage>>; 3],
    new_tokens: usize,
    prefix_cache: bool,
) -> Result<FewShotRun> {
    let c = together.len();
    let positions = prompt.ids.len() + new_tokens;
    let config = EngineConfig {
        prefix_cache,
        media_slots: c * together[0].len(),
        ..bench_config(c, positions, opts.decode_graphs)
    };
    let mut e = Engine::new(p, config)?;
    let run = |e: &mut Engine<B>, images: &[Vec<PreparedImage>], new: usize| -> Result<(f64, usize)> {
        for q in images {
            e.add_request(prompt.clone(), q.clone(), &bench_request(new))?;
        }
        timed_to_completion(p, e)
    };
    run(&mut e, warm, 1)?;
    let mut ttft = alone
        .iter()
        .map(|q| run(&mut e, std::slice::from_ref(q), 1).map(|(s, _)| s))
        .collect::<Result<Vec<f64>>>()?;
    ttft.sort_by(f64::total_cmp);
    let (seconds, tokens) = run(&mut e, together, new_tokens)?;
    let stats = e.stats();
    let rate = |hits: usize, of: usize| hits as f64 / of.max(1) as f64;
    Ok(FewShotRun {
        time_to_first_token_ms: ttft[ttft.len() / 2] * 1e3,
        requests_per_s: c as f64 / seconds,
        output_tokens_per_s: tokens as f64 / seconds,
        prefix_hit_rate: rate(stats.cache.prefix_hit_rows, stats.cache.admitted_rows),
        media_hit_rate: rate(stats.cache.media_hits, stats.cache.admitted_images),
        prefill_rows_saved: stats.prefill_rows_saved(),
        images_encoded: stats.images_encoded,
    })
}

/// Least time for `c` requests of `n` prompt tokens to generate `new` tokens each: every image through the
/// vision encoder and resampler, all prompts in one prefill (weights read once), then one decode step per further
/// token with all `c` sequences.
fn throughput_floor(costs: &dyn Floors, ceilings: &Ceilings, c: usize, n: usize, new: usize) -> f64 {
    let image = costs.image_floor(ceilings);
    let one = costs.prefill(n);
    let prefill = crate::perf::floors::Work {
        flops: c as f64 * one.flops,
        bytes: one.bytes,
    };
    let decode: f64 = (1..new)
        .map(|i| costs.decode_step(c, n + i).floor(ceilings))
        .sum();
    c as f64 * image + prefill.floor(ceilings) + decode
}

/// Seconds of `f`, from a synchronised start to a synchronised end.
pub fn time<B: Backend, T>(b: &B, f: impl FnOnce() -> T) -> f64 {
    b.synchronize();
    let start = Instant::now();
    std::hint::black_box(f());
    b.synchronize();
    start.elapsed().as_secs_f64()
}

/// Median of `repeats` runs of `f` (at least one), after one untimed warm-up run.
fn median(repeats: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    f()?;
    let mut runs = (0..repeats.max(1))
        .map(|_| f())
        .collect::<Result<Vec<f64>>>()?;
    runs.sort_by(f64::total_cmp);
    Ok(runs[runs.len() / 2])
}

/// An engine for `seqs` requests of `positions` positions each, all running at once.
pub fn bench_engine<'p, B: Backend>(
    p: &'p Pipeline<B>,
    seqs: usize,
    positions: usize,
    decode_graphs: bool,
) -> Result<Engine<'p, B>> {
    Engine::new(p, bench_config(seqs, positions, decode_graphs))
}

/// The limits of [`bench_engine`].
fn bench_config(seqs: usize, positions: usize, decode_graphs: bool) -> EngineConfig {
    let block_size = 16;
    EngineConfig {
        block_size,
        kv_blocks: seqs * positions.div_ceil(block_size),
        media_slots: seqs,
        max_seqs: seqs,
        max_step_tokens: 2048,
        decode_graphs,
        // The workloads repeat one prompt to time its computation: nothing may come from a cache.
        prefix_cache: false,
    }
}

/// A request that generates exactly `new_tokens` tokens, whatever they are.
pub fn bench_request(new_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        max_new_tokens: new_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Seconds for `c` requests to generate `new` tokens each from a standing start, and the tokens generated.
fn generate<B: Backend>(
    p: &Pipeline<B>,
    opts: &BenchOptions,
    prompt: &EncodedPrompt,
    pixels: &PreparedImage,
    c: usize,
    new: usize,
) -> Result<(f64, usize)> {
    let mut e = bench_engine(p, c, prompt.ids.len() + new, opts.decode_graphs)?;
    for _ in 0..c {
        e.add_request(prompt.clone(), vec![pixels.clone()], &bench_request(new))?;
    }
    timed_to_completion(p, &mut e)
}

/// Seconds for the engine to finish every request it has, and the tokens they generated.
fn timed_to_completion<B: Backend>(p: &Pipeline<B>, e: &mut Engine<B>) -> Result<(f64, usize)> {
    let mut tokens = 0;
    let mut result = Ok(());
    let seconds = time(&p.backend, || {
        result = e.run_to_completion(|event| {
            if let Event::Finished { output, .. } = event {
                tokens += output.generated_ids.len();
            }
        })
    });
    result.map(|_| (seconds, tokens))
}

/// Seconds per token of one request decoding `tokens` tokens after its prefill.
fn decode_seconds_per_token<B: Backend>(
    p: &Pipeline<B>,
    opts: &BenchOptions,
    prompt: &EncodedPrompt,
    pixels: &PreparedImage,
) -> Result<f64> {
    let tokens = opts.decode_tokens.max(1);
    let mut e = bench_engine(p, 1, prompt.ids.len() + tokens + 2, opts.decode_graphs)?;
    e.add_request(
        prompt.clone(),
        vec![pixels.clone()],
        &bench_request(tokens + 2),
    )?;
    // The prefill, then one decode step, where a backend that records decode steps records this one.
    e.step()?;
    e.step()?;
    let mut result = Ok(());
    let seconds = time(&p.backend, || {
        while e.pending_requests() > 0 && result.is_ok() {
            result = e.step().map(drop);
        }
    });
    result?;
    Ok(seconds / tokens as f64)
}
