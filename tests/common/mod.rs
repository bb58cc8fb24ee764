//! Shared by the integration tests: the fixture directories and their golden tensors (computed by transformers in
//! float64; never regenerated from this engine).
#![allow(dead_code)]

pub mod openflamingo;
pub mod shared_prefixes;

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
    /// IDEFICS fixtures: the `--prompt` text.
    #[serde(default)]
    pub cli_prompt: String,
    /// Llama 3.2 Vision fixtures: the rendered chat text the processor received.
    #[serde(default)]
    pub prompt_text: String,
    #[serde(default)]
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

    /// Golden pixel values of each (untiled IDEFICS) image, `[3, S, S]` as f32.
    pub fn golden_pixels(&self) -> Vec<flamingo::io::image::PreparedImage> {
        let g = self.get("pixel_values");
        let per = g.shape[1..].iter().product::<usize>();
        g.data
            .chunks(per)
            .map(|c| flamingo::io::image::PreparedImage::whole(c.iter().map(|&v| v as f32).collect()))
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

/// `n` values uniform in [-1, 1) from a seeded generator: fresh, reproducible, never all zeros.
pub fn random_values(seed: u64, n: usize) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Named random tensors written to a temporary safetensors file and opened like a checkpoint.
pub struct RandomWeights {
    _dir: tempfile::TempDir,
    pub store: flamingo::io::safetensors::WeightStore,
}

impl RandomWeights {
    /// `specs`: name, shape, and whether to store it as bf16 (else f32).
    pub fn new(seed: u64, specs: &[(&str, &[usize], bool)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = specs
            .iter()
            .enumerate()
            .map(|(i, &(name, shape, bf16))| {
                let values = random_values(seed + i as u64, shape.iter().product());
                let (dtype, bytes) = if bf16 {
                    let b = values
                        .iter()
                        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                        .collect();
                    (safetensors::Dtype::BF16, b)
                } else {
                    let b = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    (safetensors::Dtype::F32, b)
                };
                (name.to_string(), shape.to_vec(), dtype, bytes)
            })
            .collect();
        let views = data.iter().map(|(n, s, d, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        });
        let path = dir.path().join("model.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let store =
            flamingo::io::safetensors::WeightStore::open_files(&[path], "random weights".into())
                .unwrap();
        RandomWeights { _dir: dir, store }
    }

    pub fn get(&self, name: &str) -> flamingo::io::safetensors::TensorRef {
        self.store.get_any_shape(name).unwrap()
    }
}

/// The one JSON object a successful command printed (the panic shows its stderr or stdout otherwise).
pub fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A step whose rows are one-row sequences: row `r` at `position(r)`, seeing media slot `image(r)`; one shared
/// block.
pub fn one_row_seqs(
    rows: std::ops::Range<usize>,
    position: impl Fn(usize) -> usize,
    image: impl Fn(usize) -> i32,
) -> flamingo::backend::StepLayout {
    flamingo::backend::StepLayout {
        block_size: 4096,
        seqs: rows
            .map(|r| flamingo::backend::SeqStep {
                q_rows: 1,
                kv_len: position(r) + 1,
                block_table: vec![0],
                image_of_row: vec![image(r)],
                decode_from: 0,
            })
            .collect(),
    }
}

/// Greedy generation of `n` tokens.
pub fn greedy(n: usize) -> flamingo::runtime::request::GenerationRequest {
    flamingo::runtime::request::GenerationRequest {
        max_new_tokens: n,
        ..Default::default()
    }
}

/// `SeqStep::decode_from` of a step computing the last `q_rows` of `kv_len` positions: a decode when it is one row,
/// else a prompt chunk.
pub fn prompt_or_decode(q_rows: usize, kv_len: usize) -> usize {
    if q_rows == 1 {
        kv_len - 1
    } else {
        kv_len
    }
}
