//! End to end through the engine on a synthetic model: one image through the vision encoder and resampler, the
//! prefill of 1 image + 64 tokens, and one decode step with 1 and 8 sequences decoding.
//!
//! The model is `FLAMINGO_BENCH_MODEL` (a `--synthetic` name), by default `tiny` on the CPU (the bundled demo
//! model's configuration) and `idefics-9b` on a GPU. Run: `cargo bench --bench model`.

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use flamingo::io::image::PreparedImage;
use flamingo::backend::Backend;
use flamingo::cli::options::{bundled_model_dir, BackendCommand};
use flamingo::model::idefics::synthetic::Preset;
use flamingo::perf::bench::{bench_engine, bench_pixels, bench_prompt, bench_request};
use flamingo::runtime::pipeline::{ModelFiles, Pipeline};

fn preset() -> Preset {
    let default = if common::device() == "cpu" {
        "tiny"
    } else {
        "idefics-9b"
    };
    let name = std::env::var("FLAMINGO_BENCH_MODEL").unwrap_or_else(|_| default.into());
    name.parse()
        .unwrap_or_else(|e| panic!("FLAMINGO_BENCH_MODEL: {e}"))
}

struct EndToEnd<'a>(&'a mut Criterion);

impl BackendCommand for EndToEnd<'_> {
    fn run<B: Backend + 'static>(self, backend: B) -> flamingo::Result<()> {
        let preset = preset();
        let files = ModelFiles::synthetic(preset, &bundled_model_dir().unwrap().join("tokenizer.json"))?;
        end_to_end(
            self.0,
            preset,
            &Pipeline::from_files(files, backend, false)?,
        );
        Ok(())
    }
}

fn model(c: &mut Criterion) {
    common::on_device(EndToEnd(c));
}

fn end_to_end<B: Backend>(c: &mut Criterion, preset: Preset, p: &Pipeline<B>) {
    let prompt = bench_prompt(p, 64, 0).unwrap();
    let pixels = vec![bench_pixels(p).unwrap()];
    let b = &p.backend;
    let mut g = c.benchmark_group(format!("model/{}", preset.name()));
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.bench_function("encode_image", |bench| {
        bench.iter_custom(|iters| common::timed(b, iters, || p.encode_images(&pixels)))
    });
    let states = p.encode_images(&pixels);
    g.bench_function("prefill_1image_64tokens", |bench| {
        bench.iter_custom(|iters| {
            common::timed(b, iters, || {
                p.prefill_states(&prompt, &states, None).unwrap()
            })
        })
    });
    for batch in [1usize, 8] {
        g.bench_function(format!("decode_step_batch{batch}"), |bench| {
            bench.iter_custom(|iters| decode_steps(p, &prompt, &pixels, batch, iters))
        });
    }
    g.finish();
}

/// Time of `iters` engine steps with `batch` requests all decoding (their prefill done before the clock starts).
/// Sequences stop at the model's context, so long runs are split over fresh engines.
fn decode_steps<B: Backend>(
    p: &Pipeline<B>,
    prompt: &flamingo::io::prompt::EncodedPrompt,
    pixels: &[PreparedImage],
    batch: usize,
    iters: u64,
) -> Duration {
    let room = (p.idefics().unwrap().config.max_position_embeddings - prompt.ids.len() - 2) as u64;
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let steps = left.min(room);
        let new_tokens = steps as usize + 2;
        let mut engine = bench_engine(p, batch, prompt.ids.len() + new_tokens, true).unwrap();
        for _ in 0..batch {
            engine
                .add_request(prompt.clone(), pixels.to_vec(), &bench_request(new_tokens))
                .unwrap();
        }
        // The prefill, then the first decode step (where a CUDA backend records the step's graph), untimed.
        engine.step().unwrap();
        engine.step().unwrap();
        total += common::timed(&p.backend, steps, || engine.step().unwrap());
        left -= steps;
    }
    total
}

criterion_group!(benches, model);
criterion_main!(benches);
