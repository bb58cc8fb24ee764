//! Synthetic IDEFICS models: the real configurations with random weights generated in memory (drawn as
//! `model::synthetic` says), so speed can be measured at real shapes without a download.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::config::{AlphaType, IdeficsConfig};
use crate::io::safetensors::{DType, WeightStore};
use crate::model::synthetic::random_store;

/// The configurations `--synthetic` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The bundled demo model's configuration (hidden 64): seconds on a CPU.
    Tiny,
    /// `shared/bench/idefics-cpu-mid.config.json`: 293M parameters in f32, for CPU side-by-sides.
    CpuMid,
    /// HuggingFaceM4/idefics-9b, bf16.
    Idefics9b,
    /// HuggingFaceM4/idefics-80b, bf16 (about 160 GB: more than one H200 holds).
    Idefics80b,
}

pub const PRESET_NAMES: &str = "tiny, cpu-mid, idefics-9b, idefics-80b";

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Preset> {
        Ok(match s {
            "tiny" => Preset::Tiny,
            "cpu-mid" => Preset::CpuMid,
            "idefics-9b" => Preset::Idefics9b,
            "idefics-80b" => Preset::Idefics80b,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown synthetic model `{s}` (expected one of {PRESET_NAMES})"
                )))
            }
        })
    }
}


impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::CpuMid => "cpu-mid",
            Preset::Idefics9b => "idefics-9b",
            Preset::Idefics80b => "idefics-80b",
        }
    }

    /// The configuration, as its `config.json` ships.
    pub fn config(self) -> Result<IdeficsConfig> {
        let text = match self {
            Preset::Tiny => include_str!("../../../assets/demo-model/config.json"),
            Preset::CpuMid => include_str!("../../../assets/configs/cpu-mid.json"),
            Preset::Idefics9b => include_str!("../../../assets/configs/idefics-9b.json"),
            Preset::Idefics80b => include_str!("../../../assets/configs/idefics-80b.json"),
        };
        IdeficsConfig::from_json(text, Path::new(&self.description()))
    }

    /// The storage dtype: f32 for the CPU-sized models (the CPU computes in f32), bf16 for the real ones (as shipped).
    pub fn dtype(self) -> DType {
        match self {
            Preset::Tiny | Preset::CpuMid => DType::F32,
            Preset::Idefics9b | Preset::Idefics80b => DType::BF16,
        }
    }

    /// How the model is named in messages and reports.
    pub fn description(self) -> String {
        format!("<synthetic {}>", self.name())
    }

    /// Every tensor of the model, generated when it is loaded.
    pub fn store(self) -> Result<WeightStore> {
        let dtype = self.dtype();
        let tensors = tensor_specs(&self.config()?)
            .into_iter()
            .map(|(name, shape)| (name, dtype, shape))
            .collect();
        Ok(random_store(tensors, self.description()))
    }
}

/// Name and shape of every tensor of an `IdeficsForVisionText2Text` checkpoint with this configuration, as
/// transformers saves it (including the vision `post_layernorm`, which IDEFICS never runs).
pub fn tensor_specs(cfg: &IdeficsConfig) -> Vec<(String, Vec<usize>)> {
    let mut t = Vec::new();
    let (d, a) = (cfg.hidden_size, cfg.additional_vocab_size);
    t.push(("model.embed_tokens.weight".into(), vec![cfg.vocab_size, d]));
    if a > 0 {
        t.push((
            "model.embed_tokens.additional_embedding.weight".into(),
            vec![a, d],
        ));
    }
    vision_specs(cfg, &mut t);
    if cfg.use_resampler {
        resampler_specs(cfg, &mut t);
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            t.push((format!("{p}.self_attn.{proj}.weight"), vec![d, d]));
        }
        mlp_specs(cfg, &p, &mut t);
    }
    for i in 0..cfg.num_cross_layers() {
        cross_attention_specs(cfg, &format!("model.gated_cross_attn_layers.{i}"), &mut t);
    }
    t.push(("model.norm.weight".into(), vec![d]));
    t.push(("lm_head.weight".into(), vec![cfg.vocab_size, d]));
    if a > 0 {
        t.push(("lm_head.additional_fc.weight".into(), vec![a, d]));
    }
    t
}

type Specs = Vec<(String, Vec<usize>)>;

fn norm_specs(prefix: &str, width: usize, bias: bool, t: &mut Specs) {
    t.push((format!("{prefix}.weight"), vec![width]));
    if bias {
        t.push((format!("{prefix}.bias"), vec![width]));
    }
}

fn vision_specs(cfg: &IdeficsConfig, t: &mut Specs) {
    let v = &cfg.vision_config;
    let (dv, p) = (v.embed_dim, v.patch_size);
    let pre = "model.vision_model";
    t.push((format!("{pre}.embeddings.class_embedding"), vec![dv]));
    t.push((
        format!("{pre}.embeddings.patch_embedding.weight"),
        vec![dv, 3, p, p],
    ));
    t.push((
        format!("{pre}.embeddings.position_embedding.weight"),
        vec![v.num_positions(), dv],
    ));
    norm_specs(&format!("{pre}.pre_layrnorm"), dv, true, t);
    norm_specs(&format!("{pre}.post_layernorm"), dv, true, t);
    for i in 0..v.num_hidden_layers {
        let l = format!("{pre}.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.push((format!("{l}.self_attn.{proj}.weight"), vec![dv, dv]));
            t.push((format!("{l}.self_attn.{proj}.bias"), vec![dv]));
        }
        norm_specs(&format!("{l}.layer_norm1"), dv, true, t);
        norm_specs(&format!("{l}.layer_norm2"), dv, true, t);
        let m = v.intermediate_size;
        t.push((format!("{l}.mlp.fc1.weight"), vec![m, dv]));
        t.push((format!("{l}.mlp.fc1.bias"), vec![m]));
        t.push((format!("{l}.mlp.fc2.weight"), vec![dv, m]));
        t.push((format!("{l}.mlp.fc2.bias"), vec![dv]));
    }
}

fn resampler_specs(cfg: &IdeficsConfig, t: &mut Specs) {
    let (p, dv) = (&cfg.perceiver_config, cfg.vision_config.embed_dim);
    let inner = p.resampler_n_heads * p.resampler_head_dim;
    let pre = "model.perceiver_resampler";
    t.push((format!("{pre}.latents"), vec![p.resampler_n_latents, dv]));
    for i in 0..p.resampler_depth {
        let a = format!("{pre}.blocks.{i}.0");
        norm_specs(&format!("{a}.context_layer_norm"), dv, true, t);
        norm_specs(&format!("{a}.latents_layer_norm"), dv, true, t);
        if p.qk_layer_norms_perceiver {
            norm_specs(&format!("{a}.q_layer_norm"), p.resampler_head_dim, true, t);
            norm_specs(&format!("{a}.k_layer_norm"), p.resampler_head_dim, true, t);
        }
        for proj in ["q_proj", "k_proj", "v_proj"] {
            t.push((format!("{a}.{proj}.weight"), vec![inner, dv]));
        }
        t.push((format!("{a}.output_proj.weight"), vec![dv, inner]));
        let m = format!("{pre}.blocks.{i}.1");
        norm_specs(&format!("{m}.ln"), dv, true, t);
        t.push((format!("{m}.fc.weight"), vec![4 * dv, dv]));
        t.push((format!("{m}.c_proj.weight"), vec![dv, 4 * dv]));
    }
    norm_specs(&format!("{pre}.layer_norm"), dv, true, t);
}

/// SwiGLU MLP and the two RMSNorms around it (shared by decoder layers and cross-attention blocks).
fn mlp_specs(cfg: &IdeficsConfig, prefix: &str, t: &mut Specs) {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    t.push((format!("{prefix}.mlp.gate_proj.weight"), vec![i, d]));
    t.push((format!("{prefix}.mlp.up_proj.weight"), vec![i, d]));
    t.push((format!("{prefix}.mlp.down_proj.weight"), vec![d, i]));
    norm_specs(&format!("{prefix}.input_layernorm"), d, false, t);
    norm_specs(&format!("{prefix}.post_attention_layernorm"), d, false, t);
}

fn cross_attention_specs(cfg: &IdeficsConfig, prefix: &str, t: &mut Specs) {
    let (d, dv) = (cfg.hidden_size, cfg.vision_config.embed_dim);
    let gate = match cfg.alpha() {
        AlphaType::Float => vec![1],
        AlphaType::Vector => vec![1, 1, d],
    };
    t.push((format!("{prefix}.alpha_cross_attn"), gate.clone()));
    t.push((format!("{prefix}.alpha_dense"), gate));
    let x = format!("{prefix}.cross_attn");
    t.push((format!("{x}.q_proj.weight"), vec![d, d]));
    t.push((format!("{x}.k_proj.weight"), vec![d, dv]));
    t.push((format!("{x}.v_proj.weight"), vec![d, dv]));
    t.push((format!("{x}.o_proj.weight"), vec![d, d]));
    if cfg.qk_layer_norms {
        norm_specs(&format!("{x}.q_layer_norm"), cfg.head_dim(), false, t);
        norm_specs(&format!("{x}.k_layer_norm"), cfg.head_dim(), false, t);
    }
    mlp_specs(cfg, prefix, t);
}
