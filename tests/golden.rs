//! Parity with transformers' own IDEFICS (float64 golden tensors) on the three fixture models, CPU backend.

mod common;

use common::{assert_close, greedy, Fixture, FIXTURES};
use flamingo::backend::cpu::CpuBackend;
use flamingo::backend::Backend;
use flamingo::io::image::PreparedImage;
use flamingo::runtime::pipeline::{Pipeline, Preprocessor};

const TOL: f64 = 1e-3;

fn pipeline(fx: &Fixture) -> Pipeline<CpuBackend> {
    Pipeline::load(&fx.dir, CpuBackend::new(), false).unwrap()
}

#[test]
fn prompt_ids_and_image_attention_are_exact() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let p = pipeline(&fx);
        let (prompt, _) = p.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
        assert_eq!(prompt.ids, fx.ids("input_ids"), "{name}: input_ids");
        let mask = fx.get("image_attention_mask");
        let n_images = mask.shape[1];
        let one_hot: Vec<f64> = prompt
            .image_of_token
            .iter()
            .flat_map(|&img| (0..n_images).map(move |j| if img == j as i32 { 1.0 } else { 0.0 }))
            .collect();
        assert_eq!(one_hot, mask.data, "{name}: image_attention_mask");
    }
}

#[test]
fn pixel_values_within_one_level_of_255() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let p = pipeline(&fx);
        let (_, pixels) = p.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
        let golden = fx.golden_pixels();
        let Preprocessor::Idefics(pp) = &p.preprocessor else {
            panic!("{name} is an IDEFICS fixture")
        };
        let plane = pp.image_size * pp.image_size;
        for (i, (ours, theirs)) in pixels.iter().zip(&golden).enumerate() {
            let mut worst = 0f32;
            for (j, (&a, &b)) in ours.pixels.iter().zip(&theirs.pixels).enumerate() {
                let c = j / plane;
                let level = |v: f32| (v * pp.image_std[c] + pp.image_mean[c]) * 255.0;
                worst = worst.max((level(a) - level(b)).abs());
            }
            assert!(worst <= 1.0 + 1e-3, "{name} image {i}: {worst} levels off");
        }
    }
}

#[test]
fn every_stage_matches_transformers_from_golden_pixels() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let p = pipeline(&fx);
        let b = &p.backend;
        let pixels = fx.golden_pixels();
        let vision = fx.get("vision_last_hidden_state");
        let per_vision = vision.shape[1] * vision.shape[2];
        let mut states = b.zeros(0, p.idefics().unwrap().config.vision_config.embed_dim);
        for (i, px) in pixels.iter().enumerate() {
            let v = p.idefics().unwrap().vision_states(b, &px.pixels);
            let want = &vision.data[i * per_vision..(i + 1) * per_vision];
            assert_close(
                &format!("{name} vision image {i}"),
                &b.to_host(&v),
                want,
                TOL,
            );
            let s = p.idefics().unwrap().image_states_from_vision(b, &v);
            if let Some(g) = fx.tensors.get("image_hidden_states") {
                let per = g.shape[1] * g.shape[2];
                assert_close(
                    &format!("{name} resampler image {i}"),
                    &b.to_host(&s),
                    &g.data[i * per..(i + 1) * per],
                    TOL,
                );
            }
            states = b.concat_rows(&states, &s);
        }
        let (prompt, _) = p.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
        assert_eq!(prompt.ids, fx.ids("input_ids"));
        let mut hidden = Vec::new();
        let h = p
            .prefill_states(&prompt, &states, Some(&mut hidden))
            .unwrap();
        for (i, hs) in hidden.iter().enumerate() {
            assert_close(
                &format!("{name} hidden_states.{i}"),
                &b.to_host(hs),
                &fx.get(&format!("hidden_states.{i}")).data,
                TOL,
            );
        }
        assert_eq!(hidden.len(), p.idefics().unwrap().config.num_hidden_layers + 1);
        let logits = p.logits(&h);
        let rel = assert_close(
            &format!("{name} logits"),
            &b.to_host(&logits),
            &fx.get("logits").data,
            TOL,
        );
        eprintln!("{name}: logits max error {rel:.2e} x max|ref|");
    }
}

#[test]
fn greedy_ids_match_from_golden_pixels() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let p = pipeline(&fx);
        let (prompt, _) = p.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
        let want = fx.ids("generated_ids");
        let out = p
            .generate(&prompt, fx.golden_pixels(), &greedy(want.len()), |_| {})
            .unwrap();
        assert_eq!(out.generated_ids, want, "{name}: generated_ids");
    }
}

#[test]
fn greedy_ids_match_end_to_end_from_image_files() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let p = pipeline(&fx);
        let (prompt, pixels) = p.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
        let want = fx.ids("generated_ids");
        let out = p
            .generate(&prompt, pixels, &greedy(want.len()), |_| {})
            .unwrap();
        assert_eq!(out.generated_ids, want, "{name}: generated_ids");
    }
}

#[test]
fn streamed_text_equals_final_text() {
    let fx = Fixture::load("tiny-idefics-a");
    let p = pipeline(&fx);
    let (prompt, pixels) = p.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
    let mut streamed = String::new();
    let out = p
        .generate(&prompt, pixels, &greedy(8), |s| streamed.push_str(s))
        .unwrap();
    assert!(!out.text.is_empty());
    assert_eq!(streamed, out.text);
}

#[test]
fn the_image_changes_the_logits_of_tokens_that_see_it() {
    let fx = Fixture::load("tiny-idefics-a");
    let p = pipeline(&fx);
    let b = &p.backend;
    let (prompt, pixels) = p.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
    let other = fx.dir.join("../images/rocket.jpg");
    let (_, other_pixels) = p.prepare(&fx.meta.cli_prompt, &[other]).unwrap();
    let logits = |px: &[PreparedImage]| {
        let h = p.prefill(&prompt, px, None).unwrap();
        b.to_host(&p.logits(&h))
    };
    let (a, c) = (logits(&pixels), logits(&other_pixels));
    let vocab = a.len() / prompt.ids.len();
    for (t, &img) in prompt.image_of_token.iter().enumerate() {
        let diff = (0..vocab)
            .map(|j| (a[t * vocab + j] - c[t * vocab + j]).abs())
            .fold(0f32, f32::max);
        if img < 0 {
            assert_eq!(diff, 0.0, "token {t} sees no image but its logits changed");
        } else {
            assert!(
                diff > 1e-2,
                "token {t} sees the image but its logits moved only {diff}"
            );
        }
    }
}

#[test]
fn f16_weights_are_widened_inside_the_ops() {
    // Fixture a's f32 weights stored as f16: the same model up to f16 rounding of the weights.
    let fx = Fixture::load("tiny-idefics-a");
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&fx.dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    let bytes = std::fs::read(fx.dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let converted: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let data = t
                .data()
                .chunks_exact(4)
                .flat_map(|b| {
                    half::f16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes()
                })
                .collect();
            (name, t.shape().to_vec(), data)
        })
        .collect();
    let views = converted.iter().map(|(n, s, d)| {
        (
            n.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), d).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();

    let p = Pipeline::load(tmp.path(), CpuBackend::new(), false).unwrap();
    let (prompt, _) = p.prepare(&fx.meta.cli_prompt, &fx.image_paths()).unwrap();
    let h = p.prefill(&prompt, &fx.golden_pixels(), None).unwrap();
    let logits = p.backend.to_host(&p.logits(&h));
    // f16 weights carry ~5e-4 relative rounding each; through 4 layers that stays well under 2e-2.
    assert_close("f16 logits", &logits, &fx.get("logits").data, 2e-2);
    let want = fx.ids("generated_ids");
    let out = p
        .generate(&prompt, fx.golden_pixels(), &greedy(want.len()), |_| {})
        .unwrap();
    assert_eq!(out.generated_ids[0], want[0], "first greedy token");
}
