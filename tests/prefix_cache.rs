//! Prefix caching and the media cache by content on the CPU backend: outputs are the same bits with and without
//! the caches over 200 requests drawn from shared few-shot prefixes (arrivals interleaved, a pool small enough to
//! preempt and evict), and a picture differing in one pixel never shares a block past its first row.

mod common;

use common::shared_prefixes::{assert_same_outputs, image_variants, run_interleaved, shared_prefix_cases, tight_config};
use common::{fixture_dir, Fixture};
use flamingo::backend::cpu::CpuBackend;
use flamingo::io::image::PreparedImage;
use flamingo::runtime::engine::{Engine, Event};
use flamingo::runtime::pipeline::Pipeline;

#[test]
fn two_hundred_requests_give_the_same_bits_with_and_without_the_caches() {
    let fx = Fixture::load("tiny-idefics-a");
    let p = Pipeline::load(&fixture_dir("tiny-idefics-a"), CpuBackend::new(), false).unwrap();
    let images = image_variants(&fx.golden_pixels()[0]);
    let cases = shared_prefix_cases(&p, &images, 200, 17);
    let (uncached, plain) = run_interleaved(&p, tight_config(30, false), &cases, 5);
    let (cached, stats) = run_interleaved(&p, tight_config(30, true), &cases, 5);
    assert_same_outputs("cached vs uncached", &cached, &uncached);
    let c = stats.cache;
    assert_eq!((plain.cache.prefix_hit_rows, plain.cache.media_hits), (0, 0), "the cache was off");
    assert!(c.prefix_hit_rows * 3 > c.admitted_rows, "prompt rows reused: {c:?}");
    assert!(c.media_hits * 2 > c.admitted_images, "images reused: {c:?}");
    assert!(stats.images_encoded < plain.images_encoded / 2, "{} vs {}", stats.images_encoded, plain.images_encoded);
    assert!(c.block_evictions > 0 && c.media_evictions > 0, "the pools were small enough to evict: {c:?}");
    assert!(stats.preemptions > 0 && plain.preemptions > 0, "and to preempt: {} {}", stats.preemptions, plain.preemptions);
}

#[test]
fn a_picture_differing_in_one_pixel_shares_no_block_past_its_first_row() {
    let fx = Fixture::load("tiny-idefics-a");
    let p = Pipeline::load(&fixture_dir("tiny-idefics-a"), CpuBackend::new(), false).unwrap();
    let images = image_variants(&fx.golden_pixels()[0]);
    let prompt = p
        .prompt_for("Question: what is shown in the picture? Answer briefly.\n<image>Caption:", 1)
        .unwrap();
    let first_seeing = prompt.image_of_token.iter().position(|&i| i >= 0).unwrap();
    let len = prompt.ids.len();
    assert!(first_seeing >= 8 && len - first_seeing >= 8, "blocks on both sides of the image");
    let request = common::greedy(4);
    let run = |engine: &mut Engine<CpuBackend>, image: &PreparedImage| {
        let before = engine.stats().cache;
        engine.add_request(prompt.clone(), vec![image.clone()], &request).unwrap();
        let mut out = None;
        engine
            .run_to_completion(|e| {
                if let Event::Finished { output, .. } = e {
                    out = Some(output.generated_ids);
                }
            })
            .unwrap();
        let after = engine.stats().cache;
        (out.unwrap(), after.prefix_hit_rows - before.prefix_hit_rows, after.media_hits - before.media_hits)
    };
    let mut engine = Engine::new(&p, tight_config(64, true)).unwrap();
    let (a, hits, media) = run(&mut engine, &images[0]);
    assert_eq!((hits, media), (0, 0));
    let (b, hits, media) = run(&mut engine, &images[1]);
    assert_eq!(hits, first_seeing / 4 * 4, "only the blocks before the first row seeing the picture");
    assert_eq!(media, 0, "another picture");
    let (a_again, hits, media) = run(&mut engine, &images[0]);
    assert_eq!((hits, media), ((len - 1) / 4 * 4, 1), "the same picture: every full block but the last row's");
    assert_eq!(a_again, a);
    let mut fresh = Engine::new(&p, tight_config(64, false)).unwrap();
    assert_eq!(run(&mut fresh, &images[1]).0, b, "the one-pixel picture's own output");
}
