//! Synthetic models: real configurations with random weights generated in memory, so speed can be measured at real
//! shapes without a download (`--synthetic`: IDEFICS presets in `idefics::synthetic`, Llama 3.2 11B Vision in
//! `mllama::synthetic`).
//!
//! Weights are never zero (zeros hide unwritten outputs and can run faster than real data) and come from a fixed
//! seed, so every run computes the same thing. They are scaled so activations stay O(1) through any depth: a linear
//! weight has variance 1/fan_in, norm scales are near 1, biases small, embeddings and latents unit-variance, and
//! every tanh gate sits in [0.5, 1] so the image path is live (real checkpoints start some of them at zero).

use std::sync::Arc;

use rayon::prelude::*;

use crate::io::safetensors::{DType, WeightStore};

/// The seed every synthetic weight derives from.
const SEED: u64 = 0x5eed_f1a6_1d0c_0001;

/// A store of the given tensors with synthetic values (drawn by name as the module doc says: a 2-D `.weight` is a
/// linear layer's, a 1-D one a norm scale).
pub fn random_store(tensors: Vec<(String, DType, Vec<usize>)>, description: String) -> WeightStore {
    WeightStore::generated(tensors, description, Arc::new(fill))
}

/// How a tensor's values are drawn: `offset + scale * u`, u uniform in [-1, 1).
fn distribution(name: &str, shape: &[usize]) -> (f32, f32) {
    const UNIT: f32 = 1.732_050_8; // sqrt(3): uniform in [-UNIT, UNIT) has variance 1
    let is_embedding =
        (name.contains("embed") && !name.contains("patch_embedding")) || name.ends_with(".latents");
    let is_gate = name.contains(".alpha_") || name.ends_with("gate") || name.ends_with("gate_attn") || name.ends_with("gate_ffn");
    if is_gate {
        (0.75, 0.25)
    } else if is_embedding {
        (0.0, UNIT)
    } else if shape.len() == 1 && name.ends_with(".bias") {
        (0.0, 0.02)
    } else if shape.len() == 1 {
        (1.0, 0.1)
    } else {
        let fan_in: usize = shape[1..].iter().product();
        (0.0, UNIT / (fan_in.max(1) as f32).sqrt())
    }
}

/// Values per independently seeded chunk: lets large tensors fill on every core.
const CHUNK: usize = 1 << 16;

/// The store's generator: fills `out` with `name`'s values (see the module doc), the same on every call.
fn fill(name: &str, dtype: DType, shape: &[usize], out: &mut [u8]) {
    let (offset, scale) = distribution(name, shape);
    let seed = SEED ^ fnv1a(name.as_bytes());
    let size = dtype.size();
    out.par_chunks_mut(CHUNK * size)
        .enumerate()
        .for_each(|(chunk, bytes)| {
            let mut state = seed ^ (chunk as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for value in bytes.chunks_exact_mut(size) {
                let u = (splitmix64(&mut state) >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0;
                let x = offset + scale * u;
                match dtype {
                    DType::F32 => value.copy_from_slice(&x.to_le_bytes()),
                    DType::BF16 => value.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                    DType::F16 => value.copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                }
            }
        });
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
