//! Shared by the integration tests: the fixture directories and their golden tensors (computed by transformers in
//! float64; never regenerated from this engine).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

pub const FIXTURES: [&str; 3] = ["tiny-idefics-a", "tiny-idefics-b", "tiny-idefics-c"];

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[derive(Deserialize)]
pub struct GoldenMeta {
    pub cli_prompt: String,
    pub image_files: Vec<String>,
}

/// A golden tensor as f64 values with its shape.
pub struct Golden {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

pub struct Fixture {
    pub name: String,
    pub dir: PathBuf,
    pub meta: GoldenMeta,
    pub tensors: HashMap<String, Golden>,
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let dir = fixture_dir(name);
        let meta: GoldenMeta =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (k, v) in st.tensors() {
            let data: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected golden dtype {other:?}"),
            };
            tensors.insert(
                k,
                Golden {
                    shape: v.shape().to_vec(),
                    data,
                },
            );
        }
        Fixture {
            name: name.to_string(),
            dir,
            meta,
            tensors,
        }
    }

    pub fn get(&self, name: &str) -> &Golden {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: no golden tensor {name}", self.name))
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.get(name).data.iter().map(|&v| v as u32).collect()
    }

    pub fn image_paths(&self) -> Vec<PathBuf> {
        self.meta
            .image_files
            .iter()
            .map(|f| self.dir.join(f))
            .collect()
    }

    /// Golden pixel values of each image, `[3, S, S]` as f32.
    pub fn golden_pixels(&self) -> Vec<Vec<f32>> {
        let g = self.get("pixel_values");
        let per = g.shape[1..].iter().product::<usize>();
        g.data
            .chunks(per)
            .map(|c| c.iter().map(|&v| v as f32).collect())
            .collect()
    }
}

/// Max |a - ref| relative to max |ref|; panics naming `what` when above `tol` or when any value is not finite.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f64], tol: f64) -> f64 {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: {} values, expected {}",
        actual.len(),
        expected.len()
    );
    assert!(
        actual.iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = actual
        .iter()
        .zip(expected)
        .fold(0f64, |m, (&a, &e)| m.max((a as f64 - e).abs()));
    let rel = err / scale;
    assert!(
        rel <= tol,
        "{what}: max error {err:.3e} = {rel:.3e} x max|ref| ({scale:.3}), over {tol:.0e}"
    );
    rel
}
