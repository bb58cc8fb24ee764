//! OpenFlamingo's image path against goldens computed by OpenFlamingo's own code in float64
//! (`tests/fixtures/tiny-openflamingo-*`, made by `make_openflamingo_fixtures.py`): the three parts found in the
//! fixture folder, open_clip's vision tokens and the Perceiver resampler's latents from the golden pixel values,
//! on the CPU.

mod common;

use common::{assert_close, fixture_dir, Fixture};
use flamingo::backend::cpu::CpuBackend;
use flamingo::backend::Backend;
use flamingo::io::openflamingo_config::{OpenClipConfig, OpenFlamingoParts};
use flamingo::model::layers::WeightLoader;
use flamingo::model::openflamingo::OpenFlamingoMedia;

const FIXTURES: [&str; 3] = ["tiny-openflamingo-a", "tiny-openflamingo-b", "tiny-openflamingo-c"];

#[test]
fn vision_tokens_and_resampler_latents_match_openflamingo() {
    let b = CpuBackend::new();
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let parts = OpenFlamingoParts::locate(&fixture_dir(name), None, None).unwrap();
        let vision = OpenClipConfig::from_file(&parts.vision_config).unwrap();
        let store = parts.open_store().unwrap();
        let media = OpenFlamingoMedia::load(&WeightLoader::new(&store, &b, false), &vision).unwrap();
        let pixels = fx.get("pixel_values");
        let (tokens, latents) = (fx.get("vision_tokens"), fx.get("resampler_output"));
        let images = pixels.shape[1];
        let per_image = pixels.shape[3..].iter().product::<usize>();
        let (per_tokens, per_latents) = (tokens.data.len() / images, latents.data.len() / images);
        for i in 0..images {
            let image = &pixels.data[i * per_image..(i + 1) * per_image];
            let image: Vec<f32> = image.iter().map(|&v| v as f32).collect();
            let t = media.vision_tokens(&b, &image);
            let want_tokens = &tokens.data[i * per_tokens..(i + 1) * per_tokens];
            let e1 = assert_close(&format!("{name} image {i} vision tokens"), &b.to_host(&t), want_tokens, 1e-3);
            let l = media.resample(&b, &t);
            let want_latents = &latents.data[i * per_latents..(i + 1) * per_latents];
            let e2 = assert_close(&format!("{name} image {i} resampler"), &b.to_host(&l), want_latents, 1e-3);
            eprintln!("{name} image {i}: vision tokens {e1:.2e}, resampler {e2:.2e} x max|ref|");
        }
    }
}

#[test]
fn missing_parts_are_named_with_the_option_that_gives_them() {
    let dir = tempfile::tempdir().unwrap();
    let err = OpenFlamingoParts::locate(dir.path(), None, None).unwrap_err().to_string();
    assert!(err.contains("checkpoint.pt"), "{err}");
    std::fs::copy(fixture_dir("tiny-openflamingo-a").join("checkpoint.pt"), dir.path().join("checkpoint.pt")).unwrap();
    let err = OpenFlamingoParts::locate(dir.path(), None, None).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("--lang-model"), "{err}");
    for lm in ["lm-1", "lm-2"] {
        std::fs::create_dir(dir.path().join(lm)).unwrap();
        std::fs::write(dir.path().join(lm).join("config.json"), "{}").unwrap();
    }
    let err = OpenFlamingoParts::locate(dir.path(), None, None).unwrap_err().to_string();
    assert!(err.contains("2 subfolders") && err.contains("--lang-model"), "{err}");
    let lang = dir.path().join("lm-1");
    let err = OpenFlamingoParts::locate(dir.path(), Some(&lang), None).unwrap_err().to_string();
    assert!(err.contains("open_clip_pytorch_model.bin") && err.contains("--vision-model"), "{err}");
    let vision = fixture_dir("tiny-openflamingo-a").join("open_clip");
    let parts = OpenFlamingoParts::locate(dir.path(), Some(&lang), Some(&vision)).unwrap();
    assert!(parts.vision_config.ends_with("ViT-tiny-a-quickgelu.json"), "{parts:?}");
}

#[test]
fn open_clip_configs_read_in_both_layouts_and_unsupported_towers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open_clip_config.json");
    let vision = r#"{"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}"#;
    std::fs::write(&path, format!(r#"{{"model_cfg": {{"quick_gelu": true, "vision_cfg": {vision}}}}}"#)).unwrap();
    let c = OpenClipConfig::from_file(&path).unwrap();
    assert!(c.quick_gelu);
    assert_eq!((c.vision.heads(), c.vision.patch_tokens(), c.vision.mlp_width()), (16, 256, 4096));
    for (field, value) in [("timm_model_name", r#""vit_large""#), ("ls_init_value", "0.1"), ("head_width", "48")] {
        let cfg = format!(r#"{{"vision_cfg": {{"width": 1024, "patch_size": 14, "{field}": {value}}}}}"#);
        std::fs::write(&path, cfg).unwrap();
        let err = OpenClipConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains(&format!("vision_cfg.{field}")) && err.contains("open_clip_config.json"), "{err}");
    }
}
