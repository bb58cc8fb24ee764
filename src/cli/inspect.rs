//! `flamingo inspect`: what a model directory holds, checked against its config by loading it (weights stay
//! memory-mapped, so this is cheap even for idefics-80b).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::backend::cpu::CpuBackend;
use crate::cli::options::{bundled_model_dir, OpenFlamingoPartsArgs};
use crate::error::Result;
use crate::model::idefics::Idefics;
use crate::io::config::IdeficsConfig;
use crate::io::mllama_config::MllamaConfig;
use crate::io::openflamingo_config::{DecoderConfig, OpenFlamingoConfig, PartWeights};
use crate::model::mllama::Mllama;
use crate::model::openflamingo::OpenFlamingo;
use crate::model::Model;
use crate::runtime::pipeline::{FamilyConfig, ModelFiles};

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A Hugging Face model directory (IDEFICS, Llama 3.2 Vision) or an OpenFlamingo folder (default: the bundled
    /// model).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    parts: OpenFlamingoPartsArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The part of the model a tensor belongs to, for the parameter breakdown.
fn part_of(name: &str) -> &'static str {
    const PARTS: [(&str, &str); 14] = [
        ("model.vision_model.", "vision encoder"),
        ("model.perceiver_resampler.", "perceiver resampler"),
        ("model.gated_cross_attn_layers.", "gated cross-attention"),
        ("model.layers.", "decoder layers"),
        ("model.embed_tokens.", "embeddings"),
        ("model.norm.", "final norm"),
        ("lm_head.", "lm head"),
        ("vision_encoder.", "vision encoder"),
        ("perceiver.", "perceiver resampler"),
        ("lang_encoder.transformer.wte.", "embeddings"),
        ("lang_encoder.gpt_neox.embed_in.", "embeddings"),
        ("lang_encoder.embed_out.", "lm head"),
        ("lang_encoder.", "language model"),
        ("", "other"),
    ];
    // OpenFlamingo's gated blocks live inside the language model's layers.
    if name.contains(".gated_cross_attn_layer.") {
        return "gated cross-attention";
    }
    PARTS
        .iter()
        .find(|(p, _)| name.starts_with(p))
        .map(|(_, part)| *part)
        .expect("empty prefix matches")
}

/// `8929679632` -> `8,929,679,632`.
pub fn group_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn run(args: InspectArgs) -> Result<()> {
    let dir = args.model.map_or_else(bundled_model_dir, Ok)?;
    let files = ModelFiles::open_paths(&args.parts.paths(&dir))?;
    // Loading checks every tensor the config implies (names, shapes, dtypes) without reading the weights.
    let rows = match &files.config {
        FamilyConfig::Idefics(c) => {
            Idefics::load(&CpuBackend::new(), &files.store, c, false)?;
            c.total_vocab()
        }
        FamilyConfig::Mllama(c) => {
            Mllama::load(&CpuBackend::new(), &files.store, c, false)?;
            c.embedding_rows()
        }
        FamilyConfig::OpenFlamingo(c) => {
            OpenFlamingo::load(&CpuBackend::new(), &files.store, &c.vision, &c.decoder, false)?.vocab_rows()
        }
    };
    let summary = files.store.summary();
    let mut parts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut dtypes: BTreeMap<String, u64> = BTreeMap::new();
    for (name, shape, dtype) in &summary {
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        *parts.entry(part_of(name)).or_default() += n;
        *dtypes.entry(dtype.clone()).or_default() += n;
    }
    let total: u64 = parts.values().sum();
    let c = &files.config;
    let tok = &files.tokenizer;
    let mut specials = vec![
        ("bos", tok.token(tok.bos_id), tok.bos_id),
        ("eos", tok.token(tok.eos_id), tok.eos_id),
        ("image", tok.token(tok.image_id), tok.image_id),
    ];
    if let Some(id) = tok.fake_image_id {
        specials.push(("fake_image", tok.token(id), id));
    }
    if let Some(id) = tok.end_of_utterance_id {
        specials.push(("end_of_utterance", tok.token(id), id));
    }
    if args.json {
        let json = serde_json::json!({
            "model": dir,
            "model_type": files.config.model_type(),
            "parameters": total,
            "parameters_by_part": parts,
            "parameters_by_dtype": dtypes,
            "tensors": summary.len(),
            "special_tokens": specials.iter().map(|(k, t, id)| (k.to_string(), serde_json::json!({"token": t, "id": id}))).collect::<BTreeMap<_, _>>(),
        });
        println!("{json}");
        return Ok(());
    }
    println!("model: {} ({})", dir.display(), files.config.model_type());
    match c {
        FamilyConfig::Idefics(c) => print_idefics(c),
        FamilyConfig::Mllama(c) => print_mllama(c),
        FamilyConfig::OpenFlamingo(c) => print_openflamingo(c),
    }
    println!(
        "parameters: {} in {} tensors",
        group_thousands(total),
        summary.len()
    );
    for (part, n) in &parts {
        println!("  {part:<24} {:>16}", group_thousands(*n));
    }
    println!("dtypes:");
    for (dtype, n) in &dtypes {
        println!("  {dtype:<24} {:>16}", group_thousands(*n));
    }
    println!("special tokens:");
    for (kind, token, id) in &specials {
        println!("  {kind:<24} {token} = {id}");
    }
    if tok.vocab_size() > rows {
        println!(
            "warning: the tokenizer has {} tokens, the weights {} rows; ids past the rows are refused",
            tok.vocab_size(),
            rows
        );
    }
    Ok(())
}

fn print_idefics(c: &IdeficsConfig) {
    let v = &c.vision_config;
    let p = &c.perceiver_config;
    println!(
        "decoder: {} layers, hidden {}, {} heads x {}, MLP {}, vocab {} + {} additional, rms_norm_eps {}, rope theta {}, context {}",
        c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim(), c.intermediate_size,
        c.vocab_size, c.additional_vocab_size, c.rms_norm_eps, c.rope_theta(), c.max_position_embeddings
    );
    println!(
        "vision: {} layers, width {}, {} heads, MLP {}, image {} / patch {} -> {} tokens, act {}",
        v.num_hidden_layers,
        v.embed_dim,
        v.num_attention_heads,
        v.intermediate_size,
        v.image_size,
        v.patch_size,
        v.num_positions(),
        v.hidden_act
    );
    if c.use_resampler {
        println!(
            "resampler: {} latents, depth {}, {} heads x {}, qk_layer_norms {}",
            p.resampler_n_latents,
            p.resampler_depth,
            p.resampler_n_heads,
            p.resampler_head_dim,
            p.qk_layer_norms_perceiver
        );
    } else {
        println!("resampler: none (the cross-attention sees the raw vision tokens)");
    }
    println!(
        "cross-attention: {} blocks, before every {} decoder layer(s), gates {}, qk_layer_norms {}",
        c.num_cross_layers(),
        c.cross_layer_interval,
        c.alpha_type,
        c.qk_layer_norms
    );
}

fn print_openflamingo(c: &OpenFlamingoConfig) {
    let p = &c.parts;
    match &p.weights {
        PartWeights::Released { checkpoint, vision_weights } => {
            println!("checkpoint: {}", checkpoint.display());
            println!("language model: {}", p.lang_dir.display());
            println!("vision tower: {} ({})", vision_weights.display(), p.vision_config.display());
        }
        PartWeights::Converted(dir) => println!(
            "converted: {} (language model config {}, vision config {})",
            dir.join("model.safetensors").display(),
            p.lang_dir.display(),
            p.vision_config.display()
        ),
    }
    match &c.decoder {
        DecoderConfig::Mpt(d) => println!(
            "decoder: {:?} MPT, {} layers, d_model {}, {} heads x {}, MLP {}, ALiBi (max bias {}), qk LayerNorm {}, context {}",
            d.flavour, d.n_layers, d.d_model, d.n_heads, d.head_dim(), d.mlp_width, d.alibi_bias_max, d.qk_ln, d.max_seq_len
        ),
        DecoderConfig::GptNeox(d) => println!(
            "decoder: GPT-NeoX, {} layers, hidden {}, {} heads x {} (rotary on {} dims, base {}), MLP {}, parallel residual {}, context {}",
            d.num_hidden_layers, d.hidden_size, d.num_attention_heads, d.head_dim(), d.rotary_ndims,
            d.rotary_emb_base, d.intermediate_size, d.use_parallel_residual, d.max_position_embeddings
        ),
    }
    let v = &c.vision.vision;
    println!(
        "vision: open_clip ViT, {} layers, width {}, {} heads, MLP {}, image {} / patch {} -> {} patch tokens, {}",
        v.layers, v.width, v.heads(), v.mlp_width(), v.image_size, v.patch_size, v.patch_tokens(),
        if c.vision.quick_gelu { "QuickGELU" } else { "GELU" }
    );
}

fn print_mllama(c: &MllamaConfig) {
    let (t, v) = (&c.text_config, &c.vision_config);
    let rope = t.rope_frequencies();
    println!(
        "decoder: {} layers ({} self-attention, cross-attention at {:?}), hidden {}, {} heads x {} ({} kv heads), MLP {}, vocab {} (+8 rows), rms_norm_eps {}, rope theta {}{}, context {}",
        t.num_hidden_layers,
        t.self_attention_layers().len(),
        t.cross_attention_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.head_dim(),
        t.num_key_value_heads,
        t.intermediate_size,
        t.vocab_size,
        t.rms_norm_eps,
        rope.theta,
        rope.llama3.map_or(String::new(), |s| format!(
            " (llama3 x{} over {} positions)",
            s.factor, s.original_max_position_embeddings
        )),
        t.max_position_embeddings
    );
    println!(
        "vision: {} local + {} global layers, width {}, {} heads, MLP {}, tiles of {} / patch {} -> {} tokens (padded {}), up to {} tiles, intermediate {:?} -> {} wide",
        v.num_hidden_layers,
        v.num_global_layers,
        v.hidden_size,
        v.attention_heads,
        v.intermediate_size,
        v.image_size,
        v.patch_size,
        v.tokens_per_tile(),
        v.padded_tokens_per_tile(),
        v.max_num_tiles,
        v.intermediate_layers_indices,
        v.vision_output_dim
    );
}
