//! OpenFlamingo's fixtures for several test files: their image files, and the whole model driven step by step as
//! the engine drives a model, on any backend, with every hidden state (`tests/openflamingo_golden.rs`).

use std::path::PathBuf;

use flamingo::backend::{Backend, SeqStep, StepLayout};
use flamingo::io::image::{decode, read_image_file, DecodeLimits};
use flamingo::io::openflamingo_config::{DecoderConfig, OpenClipConfig, OpenFlamingoParts};
use flamingo::model::openflamingo::OpenFlamingo;
use flamingo::model::{store_images, Model};

use super::{fixture_dir, Fixture};

/// The fixture's image files in prompt order, as golden.json lists them.
pub fn image_files(name: &str) -> Vec<PathBuf> {
    let dir = fixture_dir(name);
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    let images = meta["images"].as_array().unwrap();
    images.iter().map(|i| dir.join(i["file_in_fixture"].as_str().unwrap())).collect()
}

/// What one run of the fixture's prompt gave.
pub struct WholeModel {
    pub hidden_states: Vec<Vec<f32>>,
    pub final_norm: Vec<f32>,
    pub logits: Vec<f32>,
    pub greedy_ids: Vec<u32>,
}

/// Loads fixture `name` from its three parts, encodes its image files into the media cache (K/V once per image),
/// prefills the golden prompt ids (each row seeing image `text_time`) and decodes as many greedy tokens as the
/// golden generated, each seeing the last image, through the paged KV cache.
pub fn run_whole_model<B: Backend>(b: &B, name: &str) -> WholeModel {
    let fx = Fixture::load(name);
    let parts = OpenFlamingoParts::locate(&fixture_dir(name), None, None).unwrap();
    let vision = OpenClipConfig::from_file(&parts.vision_config).unwrap();
    let decoder = DecoderConfig::from_file(&parts.lang_dir.join("config.json")).unwrap();
    let model = OpenFlamingo::load(b, &parts.open_store().unwrap(), &vision, &decoder, false).unwrap();
    let limits = DecodeLimits::pixels(1 << 24);
    let images: Vec<_> = image_files(name)
        .iter()
        .map(|p| {
            let img = decode(&read_image_file(p, 1 << 24).unwrap(), p, &limits).unwrap();
            flamingo::io::openflamingo_image::preprocess(&img, vision.vision.image_size)
        })
        .collect();
    let slots: Vec<u32> = (0..images.len() as u32).collect();
    let mut media = model.new_media_cache(b, images.len());
    store_images(&model, b, &mut media, &images, &vec![false; images.len()], &slots);
    let ids = fx.ids("input_ids");
    let seen: Vec<i32> = fx.get("text_time").data.iter().map(|&t| t as i32 - 1).collect();
    let last_image = images.len() as i32 - 1;
    let (block, new_tokens) = (16, fx.ids("generated_ids").len());
    let total = ids.len() + new_tokens;
    let mut kv = model.new_kv_cache(b, total.div_ceil(block), block);
    let table: Vec<u32> = (0..total.div_ceil(block) as u32).collect();
    let step_of = |q_rows: usize, kv_len: usize, image_of_row: Vec<i32>| StepLayout {
        block_size: block,
        seqs: vec![SeqStep { q_rows, kv_len, block_table: table.clone(), image_of_row, decode_from: ids.len() }],
    };
    let step = step_of(ids.len(), ids.len(), seen);
    let mut hidden = Vec::new();
    let h = model.forward(b, &ids, &step, &b.layout(&step), &mut kv, &media, Some(&mut hidden)).unwrap();
    let logits = b.to_host(&model.logits(b, &h));
    let vocab = model.vocab_rows();
    let argmax = |row: &[f32]| row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best }) as u32;
    let mut next = argmax(&logits[(ids.len() - 1) * vocab..]);
    let mut greedy_ids = vec![next];
    while greedy_ids.len() < new_tokens {
        let step = step_of(1, ids.len() + greedy_ids.len(), vec![last_image]);
        let h = model.forward(b, &[next], &step, &b.layout(&step), &mut kv, &media, None).unwrap();
        next = argmax(&b.to_host(&model.logits(b, &h)));
        greedy_ids.push(next);
    }
    WholeModel {
        hidden_states: hidden.iter().map(|t| b.to_host(t)).collect(),
        final_norm: b.to_host(&h),
        logits,
        greedy_ids,
    }
}
