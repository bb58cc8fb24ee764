//! The bundled demo model (`assets/demo-model`, trained by `tools/demo_model`) on its held-out pictures
//! (`tests/fixtures/demo-heldout`, drawn from another seed than the training data): for every picture the engine's
//! greedy ids equal those of transformers' own `generate` on the same directory, and at least 90% of the answers are
//! exactly the generator's ground truth.

use std::path::PathBuf;

use flamingo::io::image::PreparedImage;
use flamingo::backend::cpu::CpuBackend;
use flamingo::backend::Backend;
use flamingo::io::prompt::EncodedPrompt;
use flamingo::runtime::pipeline::Pipeline;
use flamingo::runtime::request::{FinishReason, GenerationRequest};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    max_new_tokens: usize,
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    image: String,
    /// The prompt as the CLI takes it (`<image>` marker, `<end_of_utterance>` closing the user turn).
    prompt: String,
    /// The correct answer, from the picture generator.
    answer: String,
    /// transformers' processor output for the prompt.
    prompt_ids: Vec<u32>,
    /// transformers' greedy continuation, ending with `<end_of_utterance>`.
    generated_ids: Vec<u32>,
    generated_text: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load() -> (Expected, PathBuf, Pipeline<CpuBackend>) {
    let dir = root().join("tests/fixtures/demo-heldout");
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let pipeline =
        Pipeline::load(&root().join("assets/demo-model"), CpuBackend::new(), false).unwrap();
    (expected, dir, pipeline)
}

/// Where the engine's ids leave transformers': the step, both tokens and the engine's logits for each, computed by
/// a fresh prefill over the prompt plus the ids both agree on.
fn divergence(
    p: &Pipeline<CpuBackend>,
    prompt: &EncodedPrompt,
    pixels: &[PreparedImage],
    ours: &[u32],
    theirs: &[u32],
) -> String {
    let k = ours.iter().zip(theirs).take_while(|(a, b)| a == b).count();
    let mut ids = prompt.ids.clone();
    ids.extend_from_slice(&theirs[..k]);
    let last_image = *prompt.image_of_token.last().unwrap();
    let mut image_of_token = prompt.image_of_token.clone();
    image_of_token.resize(ids.len(), last_image);
    let prefix = EncodedPrompt {
        text: String::new(),
        ids,
        image_of_token,
        num_images: prompt.num_images,
        joins_previous: prompt.joins_previous.clone(),
    };
    let h = p.prefill(&prefix, pixels, None).unwrap();
    let b = &p.backend;
    let last = b.slice_rows(&h, b.dims(&h).0 - 1, 1);
    let logits = b.to_host(&p.logits(&last));
    let tok = &p.tokenizer;
    let show = |id: Option<&u32>| match id {
        Some(&id) => format!(
            "{id} {:?} (logit {:.4})",
            tok.token(id),
            logits[id as usize]
        ),
        None => "end".to_string(),
    };
    format!(
        "step {k}: engine {}, transformers {}",
        show(ours.get(k)),
        show(theirs.get(k))
    )
}

#[test]
fn heldout_captions_equal_transformers_and_are_right() {
    let (expected, dir, p) = load();
    assert!(
        expected.items.len() >= 50,
        "only {} held-out items",
        expected.items.len()
    );
    let request = GenerationRequest {
        max_new_tokens: expected.max_new_tokens,
        ..Default::default()
    };
    let mut right = 0;
    let mut mismatches = Vec::new();
    let mut wrong = Vec::new();
    for item in &expected.items {
        let (prompt, pixels) = p.prepare(&item.prompt, &[dir.join(&item.image)]).unwrap();
        assert_eq!(prompt.ids, item.prompt_ids, "{}: prompt ids", item.image);
        let out = p
            .generate(&prompt, pixels.clone(), &request, |_| {})
            .unwrap();
        if out.generated_ids != item.generated_ids {
            mismatches.push(format!(
                "{} {:?}: engine {:?} {:?}, transformers {:?} {:?}; {}",
                item.image,
                item.prompt,
                out.generated_ids,
                out.text,
                item.generated_ids,
                item.generated_text,
                divergence(
                    &p,
                    &prompt,
                    &pixels,
                    &out.generated_ids,
                    &item.generated_ids
                )
            ));
        } else {
            assert_eq!(
                out.text, item.generated_text,
                "{}: decoded text",
                item.image
            );
        }
        if out.text == item.answer {
            right += 1;
            assert_eq!(out.finish_reason, FinishReason::Stop, "{}", item.image);
        } else {
            wrong.push(format!(
                "{} {:?}: {:?}, want {:?}",
                item.image, item.prompt, out.text, item.answer
            ));
        }
    }
    let n = expected.items.len();
    println!(
        "demo model, {n} held-out pictures: {right} exactly right ({:.1}%), {} equal to transformers",
        100.0 * right as f64 / n as f64,
        n - mismatches.len()
    );
    for w in &wrong {
        println!("  wrong: {w}");
    }
    assert!(
        mismatches.is_empty(),
        "{} of {n} differ from transformers:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert!(
        right * 10 >= n * 9,
        "only {right} of {n} answers exactly right:\n{}",
        wrong.join("\n")
    );
}

/// The bundled directory is what the engine's defaults expect: an instruct-style tokenizer whose
/// `<end_of_utterance>` stops generation, image tokens in the decoupled vocabulary, a resampler and gated
/// cross-attention layers.
#[test]
fn bundled_model_has_the_idefics_parts() {
    let (_, _, p) = load();
    let cfg = &p.idefics().unwrap().config;
    let tok = &p.tokenizer;
    assert!(cfg.use_resampler);
    assert!(cfg.num_cross_layers() >= 1);
    let eou = tok
        .end_of_utterance_id
        .expect("<end_of_utterance> in the tokenizer");
    let fake = tok.fake_image_id.expect("<fake_token_around_image> in the tokenizer");
    for id in [fake, tok.image_id, eou] {
        assert!(
            (cfg.vocab_size..cfg.total_vocab()).contains(&(id as usize)),
            "{} ({id}) is not in the additional vocabulary",
            tok.token(id)
        );
    }
    let size: u64 = std::fs::read_dir(root().join("assets/demo-model"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(size < 16 << 20, "the bundled model is {size} bytes");
}
