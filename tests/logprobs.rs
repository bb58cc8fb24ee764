//! Log-probabilities against an oracle computed here: a fresh prefill over the prompt plus the tokens before each
//! step, the step's logits adjusted as the rule says (banned ids, OpenAI's logit bias and frequency / presence
//! penalties of the tokens generated so far), and their log-softmax in f64. The engine's reported values (sampled
//! tokens, the top tokens, and the prompt's own tokens) must equal it within 1e-4.

mod common;

use std::path::PathBuf;

use flamingo::backend::cpu::CpuBackend;
use flamingo::backend::Backend;
use flamingo::io::image::PreparedImage;
use flamingo::io::prompt::EncodedPrompt;
use flamingo::model::sampling::SamplingParams;
use flamingo::runtime::pipeline::Pipeline;
use flamingo::runtime::request::{GenerationOutput, GenerationRequest};

fn demo() -> Pipeline<CpuBackend> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo-model");
    Pipeline::load(&dir, CpuBackend::new(), false).unwrap()
}

fn picture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/demo-heldout/003.png")
}

/// Every row's logits of `ids` (the prompt and, after it, tokens that see the image the last prompt token saw).
fn logits_of(
    p: &Pipeline<CpuBackend>,
    prompt: &EncodedPrompt,
    pixels: &[PreparedImage],
    ids: &[u32],
) -> Vec<Vec<f32>> {
    let mut image_of_token = prompt.image_of_token.clone();
    image_of_token.resize(ids.len(), *prompt.image_of_token.last().unwrap());
    let all = EncodedPrompt {
        text: String::new(),
        ids: ids.to_vec(),
        image_of_token,
        num_images: prompt.num_images,
        joins_previous: prompt.joins_previous.clone(),
    };
    let h = p.prefill(&all, pixels, None).unwrap();
    let flat = p.backend.to_host(&p.logits(&h));
    flat.chunks(flat.len() / ids.len()).map(<[f32]>::to_vec).collect()
}

/// log-softmax in f64 (-inf entries have probability 0).
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = mx + row.iter().map(|&l| (l as f64 - mx).exp()).sum::<f64>().ln();
    row.iter().map(|&l| l as f64 - lse).collect()
}

fn generate(p: &Pipeline<CpuBackend>, sampling: SamplingParams, prompt_logprobs: Option<usize>) -> (EncodedPrompt, Vec<PreparedImage>, GenerationOutput) {
    let text = "User:<image>What shape is red?<end_of_utterance>\nAssistant:";
    let (prompt, pixels) = p.prepare(text, &[picture()]).unwrap();
    let request = GenerationRequest {
        max_new_tokens: 8,
        sampling,
        prompt_logprobs,
        ..Default::default()
    };
    let out = p.generate(&prompt, pixels.clone(), &request, |_| {}).unwrap();
    (prompt, pixels, out)
}

#[test]
fn sampled_tokens_logprobs_equal_the_oracle_log_softmax_after_bans_bias_and_penalties() {
    let p = demo();
    let banned = p.tokenizer.banned_ids.clone();
    for temperature in [0.0, 1.0] {
        let sampling = SamplingParams {
            temperature,
            seed: 11,
            logprobs: Some(5),
            frequency_penalty: 0.7,
            presence_penalty: 0.4,
            logit_bias: vec![(150, 2.5), (7, -3.0)],
            ..Default::default()
        };
        let (prompt, pixels, out) = generate(&p, sampling.clone(), None);
        assert_eq!(out.logprobs.len(), out.generated_ids.len());
        assert!(out.generated_ids.len() >= 2, "{:?}", out.generated_ids);
        let mut ids = prompt.ids.clone();
        ids.extend_from_slice(&out.generated_ids);
        let rows = logits_of(&p, &prompt, &pixels, &ids[..ids.len() - 1]);
        for (t, lp) in out.logprobs.iter().enumerate() {
            let mut row = rows[prompt.ids.len() - 1 + t].clone();
            banned.iter().for_each(|&b| row[b as usize] = f32::NEG_INFINITY);
            for &(id, bias) in &sampling.logit_bias {
                row[id as usize] += bias;
            }
            let before = &out.generated_ids[..t];
            for id in before.iter().copied().collect::<std::collections::BTreeSet<u32>>() {
                let count = before.iter().filter(|&&g| g == id).count() as f32;
                row[id as usize] -= sampling.frequency_penalty * count + sampling.presence_penalty;
            }
            let oracle = log_softmax(&row);
            let token = out.generated_ids[t];
            assert_eq!(lp.token, token);
            let err = (lp.logprob as f64 - oracle[token as usize]).abs();
            assert!(err < 1e-4, "T={temperature} step {t}: {} vs {}", lp.logprob, oracle[token as usize]);
            assert_eq!(lp.top.len(), 5);
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| oracle[b].total_cmp(&oracle[a]).then(a.cmp(&b)));
            for (k, &(id, l)) in lp.top.iter().enumerate() {
                assert_eq!(id as usize, order[k], "step {t} top {k}");
                assert!((l as f64 - oracle[id as usize]).abs() < 1e-4);
            }
        }
    }
}

#[test]
fn prompt_logprobs_equal_the_oracle_and_scoring_alone_gives_the_same() {
    let p = demo();
    let (prompt, pixels, out) = generate(&p, SamplingParams::default(), Some(3));
    assert_eq!(out.prompt_logprobs.len(), prompt.ids.len() - 1);
    let rows = logits_of(&p, &prompt, &pixels, &prompt.ids);
    for (i, lp) in out.prompt_logprobs.iter().enumerate() {
        let oracle = log_softmax(&rows[i]);
        let token = prompt.ids[i + 1];
        assert_eq!(lp.token, token);
        assert!((lp.logprob as f64 - oracle[token as usize]).abs() < 1e-4, "position {i}");
        assert_eq!(lp.top.len(), 3);
    }
    // Asking for no new tokens only scores: the same values, nothing generated.
    let request = GenerationRequest {
        max_new_tokens: 0,
        prompt_logprobs: Some(3),
        ..Default::default()
    };
    let scored = p.generate(&prompt, pixels, &request, |_| {}).unwrap();
    assert!(scored.generated_ids.is_empty() && scored.text.is_empty());
    assert_eq!(scored.prompt_logprobs, out.prompt_logprobs);
}
