//! Synthetic Llama 3.2 11B Vision: its hub `config.json` with random bf16 weights generated in memory (drawn as
//! `model::synthetic` says), every tensor the hub checkpoint has, named and shaped as it names and shapes them.

use std::path::Path;

use crate::error::Result;
use crate::io::mllama_config::MllamaConfig;
use crate::io::safetensors::{DType, WeightStore};
use crate::model::synthetic::random_store;

/// meta-llama/Llama-3.2-11B-Vision-Instruct's `config.json`.
pub fn config_11b() -> Result<MllamaConfig> {
    MllamaConfig::from_json(
        include_str!("../../../assets/configs/mllama-11b.json"),
        Path::new("<synthetic mllama-11b>"),
    )
}

/// Every tensor of the 11B model, bf16 as shipped, generated when it is loaded.
pub fn store_11b() -> Result<WeightStore> {
    let tensors = tensor_specs(&config_11b()?)
        .into_iter()
        .map(|(name, shape)| (name, DType::BF16, shape))
        .collect();
    Ok(random_store(tensors, "<synthetic mllama-11b>".into()))
}

/// Name and shape of every tensor of an `MllamaForConditionalGeneration` checkpoint with this configuration, in
/// the hub's layout (`language_model.model.*`, `vision_model.*`, `multi_modal_projector.*`).
pub fn tensor_specs(cfg: &MllamaConfig) -> Vec<(String, Vec<usize>)> {
    let mut t = Vec::new();
    vision_specs(cfg, &mut t);
    let (tc, h) = (&cfg.text_config, cfg.text_config.hidden_size);
    let (kv, hd, inter) = (tc.kv_width(), tc.head_dim(), tc.intermediate_size);
    let lm = "language_model.model";
    t.push((format!("{lm}.embed_tokens.weight"), vec![cfg.embedding_rows(), h]));
    for i in 0..tc.num_hidden_layers {
        let p = format!("{lm}.layers.{i}");
        let attn = if tc.cross_attention_layers.contains(&i) {
            t.push((format!("{p}.cross_attn_attn_gate"), vec![1]));
            t.push((format!("{p}.cross_attn_mlp_gate"), vec![1]));
            t.push((format!("{p}.cross_attn.q_norm.weight"), vec![hd]));
            t.push((format!("{p}.cross_attn.k_norm.weight"), vec![hd]));
            "cross_attn"
        } else {
            "self_attn"
        };
        for (proj, out) in [("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)] {
            t.push((format!("{p}.{attn}.{proj}.weight"), vec![out, h]));
        }
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, h]));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![inter, h]));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![h, inter]));
        t.push((format!("{p}.input_layernorm.weight"), vec![h]));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    t.push((format!("{lm}.norm.weight"), vec![h]));
    t.push(("multi_modal_projector.weight".into(), vec![h, cfg.vision_config.vision_output_dim]));
    t.push(("multi_modal_projector.bias".into(), vec![h]));
    t.push(("language_model.lm_head.weight".into(), vec![tc.vocab_size, h]));
    t
}

fn vision_specs(cfg: &MllamaConfig, t: &mut Vec<(String, Vec<usize>)>) {
    let v = &cfg.vision_config;
    let (d, m, tiles, p) = (v.hidden_size, v.intermediate_size, v.max_num_tiles, v.tokens_per_tile());
    let ratios = v.supported_aspect_ratios.len() + 1;
    let vm = "vision_model";
    t.push((format!("{vm}.class_embedding"), vec![d]));
    t.push((format!("{vm}.patch_embedding.weight"), vec![d, 3, v.patch_size, v.patch_size]));
    t.push((format!("{vm}.gated_positional_embedding.gate"), vec![1]));
    t.push((format!("{vm}.gated_positional_embedding.embedding"), vec![p, d]));
    t.push((format!("{vm}.gated_positional_embedding.tile_embedding.weight"), vec![ratios, tiles * p * d]));
    for table in ["pre_tile_positional_embedding", "post_tile_positional_embedding"] {
        t.push((format!("{vm}.{table}.gate"), vec![1]));
        t.push((format!("{vm}.{table}.embedding.weight"), vec![ratios, tiles * d]));
    }
    for norm in ["layernorm_pre", "layernorm_post"] {
        t.push((format!("{vm}.{norm}.weight"), vec![d]));
        t.push((format!("{vm}.{norm}.bias"), vec![d]));
    }
    for (group, layers, gated) in [
        ("transformer", v.num_hidden_layers, false),
        ("global_transformer", v.num_global_layers, true),
    ] {
        for i in 0..layers {
            let l = format!("{vm}.{group}.layers.{i}");
            if gated {
                t.push((format!("{l}.gate_attn"), vec![1]));
                t.push((format!("{l}.gate_ffn"), vec![1]));
            }
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                t.push((format!("{l}.self_attn.{proj}.weight"), vec![d, d]));
            }
            t.push((format!("{l}.mlp.fc1.weight"), vec![m, d]));
            t.push((format!("{l}.mlp.fc1.bias"), vec![m]));
            t.push((format!("{l}.mlp.fc2.weight"), vec![d, m]));
            t.push((format!("{l}.mlp.fc2.bias"), vec![d]));
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                t.push((format!("{l}.{norm}.weight"), vec![d]));
                t.push((format!("{l}.{norm}.bias"), vec![d]));
            }
        }
    }
}
