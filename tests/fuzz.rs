//! A mutation fuzzer that runs on stable Rust, in CI: seed inputs for each parser a user or client reaches (the
//! safetensors header and its tensors, `config.json`, image decoding, chat request bodies and their prompt
//! template) are mutated at random (bit flips, byte overwrites with boundary values, insertions, deletions,
//! duplicated runs, truncation) and fed to the parser, which must return (Ok or a clean error) without panicking.
//!
//! `cargo test --release --test fuzz` runs 100,000 inputs per target (a few seconds each); the longer run is
//! `FLAMINGO_FUZZ_ITERS=1000000 FLAMINGO_FUZZ_SEED=<n> cargo test --release --test fuzz -- --nocapture`. A failure
//! prints the seed and iteration that reproduce it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use flamingo::io::config::IdeficsConfig;
use flamingo::io::image::{decode_rgb, DecodeLimits};
use flamingo::io::safetensors::WeightStore;
use flamingo::server::openai::{ChatRequest, ChatTemplate};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn iterations() -> usize {
    std::env::var("FLAMINGO_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn base_seed() -> u64 {
    std::env::var("FLAMINGO_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261202)
}

/// One random mutation of `input`, in place.
fn mutate(rng: &mut StdRng, input: &mut Vec<u8>) {
    const BOUNDARY: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'9'];
    let len = input.len();
    match rng.random_range(0..7) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] = BOUNDARY[rng.random_range(0..BOUNDARY.len())];
        }
        2 => {
            let i = rng.random_range(0..=len);
            input.insert(i, rng.random());
        }
        3 if len > 0 => {
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=16.min(len - i));
            input.drain(i..i + n);
        }
        4 if len > 0 => {
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=64.min(len - i));
            let run: Vec<u8> = input[i..i + n].to_vec();
            let at = rng.random_range(0..=len);
            input.splice(at..at, run);
        }
        5 if len > 0 => input.truncate(rng.random_range(0..len)),
        _ if len >= 4 => {
            // A little-endian length field set huge or to zero.
            let i = rng.random_range(0..len - 3);
            let v: u32 = [0, u32::MAX, 0x7fff_ffff, 65535][rng.random_range(0..4)];
            input[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
        _ => input.push(rng.random()),
    }
}

/// Feeds `iterations()` mutants of the seeds (1 to 4 mutations each) to `target`; fails on the first panic.
fn fuzz(name: &str, seeds: &[Vec<u8>], target: impl Fn(&[u8])) {
    let seed = base_seed() ^ name.len() as u64 * 0x9e37_79b9;
    let mut rng = StdRng::seed_from_u64(seed);
    let n = iterations();
    for i in 0..n {
        let mut input = seeds[rng.random_range(0..seeds.len())].clone();
        for _ in 0..rng.random_range(1..=4) {
            mutate(&mut rng, &mut input);
        }
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            panic!(
                "{name}: input {i} of seed {seed} panicked ({} bytes: {:?})",
                input.len(),
                &input[..input.len().min(200)]
            );
        }
    }
    eprintln!("{name}: {n} inputs, no panic");
}

fn encoded(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[test]
fn image_decoding_never_panics() {
    let img = image::RgbImage::from_fn(12, 9, |x, y| image::Rgb([x as u8 * 20, y as u8 * 25, 99]));
    let seeds: Vec<Vec<u8>> = [
        image::ImageFormat::Png,
        image::ImageFormat::Gif,
        image::ImageFormat::Jpeg,
    ]
    .into_iter()
    .map(|f| encoded(&img, f))
    .collect();
    let limits = DecodeLimits::pixels(1 << 20);
    fuzz("image", &seeds, |bytes| {
        let _ = decode_rgb(bytes, Path::new("fuzz"), &limits);
    });
}

#[test]
fn config_parsing_never_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-idefics-a");
    let seed = std::fs::read(dir.join("config.json")).unwrap();
    fuzz("config.json", &[seed], |bytes| {
        if let Ok(text) = std::str::from_utf8(bytes) {
            let _ = IdeficsConfig::from_json(text, Path::new("config.json"));
        }
    });
}

#[test]
fn chat_bodies_and_their_template_never_panic() {
    let seeds: Vec<Vec<u8>> = [
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0.5}"#,
        r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "what?"}]}], "stream": true, "stop": ["\n", "x"], "seed": 3}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let template = ChatTemplate::default();
    fuzz("chat body", &seeds, |bytes| {
        if let Ok(req) = serde_json::from_slice::<ChatRequest>(bytes) {
            let _ = template.render(&req.messages);
        }
    });
}

#[test]
fn safetensors_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..24u8).collect();
    let views = [
        (
            "a.weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data[..16])
                .unwrap(),
        ),
        (
            "b.bias",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![4], &data[16..24])
                .unwrap(),
        ),
    ];
    let seed = safetensors::serialize(views, None).unwrap();
    let path = dir.path().join("model.safetensors");
    // Each input is a file on disk, as users give them.
    let n = iterations();
    let mut rng = StdRng::seed_from_u64(base_seed());
    for i in 0..n {
        let mut input = seed.clone();
        for _ in 0..rng.random_range(1..=4) {
            mutate(&mut rng, &mut input);
        }
        std::fs::write(&path, &input).unwrap();
        let run = || {
            if let Ok(store) = WeightStore::open_files(std::slice::from_ref(&path), "fuzz".into()) {
                for name in ["a.weight", "b.bias"] {
                    if let Ok(t) = store.get_any_shape(name) {
                        let _ = t.first_non_finite();
                    }
                }
            }
        };
        assert!(
            catch_unwind(AssertUnwindSafe(run)).is_ok(),
            "safetensors: input {i} panicked: {input:?}"
        );
    }
    eprintln!("safetensors: {n} files, no panic");
}
