//! idefics-9b at its real size: its hub `config.json` (tests/data, partial sub-configs as shipped) and every tensor
//! name and shape it has, in bf16, as zero-filled sparse shards (no download, ~0 bytes of disk). The engine must
//! load it, count 8,929,679,632 parameters, and run an image and a prompt through it on the CPU without upcasting
//! the 17.9 GB of weights (anonymous memory stays far below the 35.7 GB an f32 copy would take).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// (name, shape) of every idefics-9b tensor (transformers' IdeficsForVisionText2Text, vision ViT-H/14).
fn idefics_9b_tensors() -> Vec<(String, Vec<usize>)> {
    let (d, inter, layers, dv, mv, hd) = (4096, 11008, 32, 1280, 5120, 128);
    let (inner, n_lat) = (16 * 96, 64);
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: String, shape: &[usize]| t.push((name, shape.to_vec()));
    add("model.embed_tokens.weight".into(), &[32000, d]);
    add(
        "model.embed_tokens.additional_embedding.weight".into(),
        &[2, d],
    );
    let v = "model.vision_model";
    add(format!("{v}.embeddings.class_embedding"), &[dv]);
    add(
        format!("{v}.embeddings.patch_embedding.weight"),
        &[dv, 3, 14, 14],
    );
    add(
        format!("{v}.embeddings.position_embedding.weight"),
        &[257, dv],
    );
    for n in ["pre_layrnorm", "post_layernorm"] {
        add(format!("{v}.{n}.weight"), &[dv]);
        add(format!("{v}.{n}.bias"), &[dv]);
    }
    for i in 0..32 {
        let p = format!("{v}.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(format!("{p}.self_attn.{proj}.weight"), &[dv, dv]);
            add(format!("{p}.self_attn.{proj}.bias"), &[dv]);
        }
        for n in ["layer_norm1", "layer_norm2"] {
            add(format!("{p}.{n}.weight"), &[dv]);
            add(format!("{p}.{n}.bias"), &[dv]);
        }
        add(format!("{p}.mlp.fc1.weight"), &[mv, dv]);
        add(format!("{p}.mlp.fc1.bias"), &[mv]);
        add(format!("{p}.mlp.fc2.weight"), &[dv, mv]);
        add(format!("{p}.mlp.fc2.bias"), &[dv]);
    }
    let r = "model.perceiver_resampler";
    add(format!("{r}.latents"), &[n_lat, dv]);
    for j in 0..6 {
        let a = format!("{r}.blocks.{j}.0");
        for n in ["context_layer_norm", "latents_layer_norm"] {
            add(format!("{a}.{n}.weight"), &[dv]);
            add(format!("{a}.{n}.bias"), &[dv]);
        }
        for n in ["q_layer_norm", "k_layer_norm"] {
            add(format!("{a}.{n}.weight"), &[96]);
            add(format!("{a}.{n}.bias"), &[96]);
        }
        for n in ["q_proj", "k_proj", "v_proj"] {
            add(format!("{a}.{n}.weight"), &[inner, dv]);
        }
        add(format!("{a}.output_proj.weight"), &[dv, inner]);
        let m = format!("{r}.blocks.{j}.1");
        add(format!("{m}.ln.weight"), &[dv]);
        add(format!("{m}.ln.bias"), &[dv]);
        add(format!("{m}.fc.weight"), &[4 * dv, dv]);
        add(format!("{m}.c_proj.weight"), &[dv, 4 * dv]);
    }
    add(format!("{r}.layer_norm.weight"), &[dv]);
    add(format!("{r}.layer_norm.bias"), &[dv]);
    let mlp = |add: &mut dyn FnMut(String, &[usize]), p: &str| {
        add(format!("{p}.mlp.gate_proj.weight"), &[inter, d]);
        add(format!("{p}.mlp.up_proj.weight"), &[inter, d]);
        add(format!("{p}.mlp.down_proj.weight"), &[d, inter]);
        add(format!("{p}.input_layernorm.weight"), &[d]);
        add(format!("{p}.post_attention_layernorm.weight"), &[d]);
    };
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            add(format!("{p}.self_attn.{proj}.weight"), &[d, d]);
        }
        mlp(&mut add, &p);
    }
    for k in 0..layers / 4 {
        let p = format!("model.gated_cross_attn_layers.{k}");
        add(format!("{p}.alpha_cross_attn"), &[1]);
        add(format!("{p}.alpha_dense"), &[1]);
        add(format!("{p}.cross_attn.q_proj.weight"), &[d, d]);
        add(format!("{p}.cross_attn.k_proj.weight"), &[d, dv]);
        add(format!("{p}.cross_attn.v_proj.weight"), &[d, dv]);
        add(format!("{p}.cross_attn.o_proj.weight"), &[d, d]);
        add(format!("{p}.cross_attn.q_layer_norm.weight"), &[hd]);
        add(format!("{p}.cross_attn.k_layer_norm.weight"), &[hd]);
        mlp(&mut add, &p);
    }
    add("model.norm.weight".into(), &[d]);
    add("lm_head.weight".into(), &[32000, d]);
    add("lm_head.additional_fc.weight".into(), &[2, d]);
    t
}

/// Writes bf16 shards whose data is a hole (reads as zeros, takes no disk), plus the index.
fn write_sparse_checkpoint(dir: &Path, tensors: &[(String, Vec<usize>)], shards: usize) {
    let per_shard = tensors.len().div_ceil(shards);
    let mut weight_map = BTreeMap::new();
    for (s, chunk) in tensors.chunks(per_shard).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, shape) in chunk {
            let bytes = shape.iter().product::<usize>() * 2;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
            weight_map.insert(name.clone(), file.clone());
        }
        let mut json = serde_json::Value::Object(header).to_string();
        while json.len() % 8 != 0 {
            json.push(' ');
        }
        let mut f = File::create(dir.join(&file)).unwrap();
        f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
        f.write_all(json.as_bytes()).unwrap();
        f.set_len((8 + json.len() + offset) as u64).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The peak of a status field of a running process (kB), polled until it exits.
fn run_measuring(cmd: &mut Command, field: &str) -> (std::process::Output, u64) {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    while child.try_wait().unwrap().is_none() {
        if let Ok(status) = std::fs::read_to_string(&status_path) {
            for line in status.lines().filter(|l| l.starts_with(field)) {
                let kb: u64 = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                peak = peak.max(kb);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), peak)
}

#[test]
fn idefics_9b_shapes_load_count_and_run_within_memory() {
    // On disk (target/), not tmpfs: faulting a tmpfs hole would allocate memory.
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = root.path().join("idefics-9b");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        fixture("tests/data/idefics-9b-config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    // Any LLaMA-style tokenizer with the IDEFICS specials will do; ids stay below the real vocabulary.
    std::fs::copy(
        fixture("tests/fixtures/tiny-idefics-a/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let tensors = idefics_9b_tensors();
    write_sparse_checkpoint(&dir, &tensors, 4);

    let inspect = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["inspect", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert!(text.contains("parameters: 8,929,679,632"), "{text}");
    assert!(
        text.contains(
            "vision: 32 layers, width 1280, 16 heads, MLP 5120, image 224 / patch 14 -> 257 tokens"
        ),
        "{text}"
    );

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flamingo"));
    cmd.args([
        "generate",
        "--device",
        "cpu",
        "--json",
        "--max-new-tokens",
        "2",
        "--model",
    ])
    .arg(&dir);
    cmd.args([
        "--prompt",
        "User:<image>Describe this image.\nAssistant:",
        "--image",
    ]);
    cmd.arg(fixture("tests/fixtures/images/rocket.jpg"));
    let (out, peak_anon_kb) = run_measuring(&mut cmd, "RssAnon:");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 2);
    let peak_gb = peak_anon_kb as f64 / 1e6;
    eprintln!("idefics-9b shapes on CPU: peak anonymous memory {peak_gb:.2} GB");
    assert!(
        peak_gb < 4.0,
        "peak anonymous memory {peak_gb:.2} GB: weights are being copied, not mapped"
    );
}

/// The tiny fixtures' Llama-3-shaped tokenizer with its special tokens moved to the real ids (128000 ..
/// 128015, `<|image|>` = 128256), as the real checkpoint numbers them.
fn real_id_tokenizer(dir: &Path) {
    let path = fixture("tests/fixtures/tiny-mllama-a/tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let remap = |id: u64| match id {
        368..=383 => id - 368 + 128000,
        384 => 128256,
        _ => id,
    };
    // tokenizers numbers added tokens after the model's vocabulary unless the vocabulary has them: put them there.
    let mut moved = Vec::new();
    for token in t["added_tokens"].as_array_mut().unwrap() {
        let id = remap(token["id"].as_u64().unwrap());
        token["id"] = id.into();
        moved.push((token["content"].as_str().unwrap().to_string(), id));
    }
    for (content, id) in moved {
        t["model"]["vocab"][content] = id.into();
    }
    let processors = t["post_processor"]["processors"].as_array_mut().unwrap();
    for p in processors.iter_mut().filter(|p| p["type"] == "TemplateProcessing") {
        for special in p["special_tokens"].as_object_mut().unwrap().values_mut() {
            for id in special["ids"].as_array_mut().unwrap() {
                *id = remap(id.as_u64().unwrap()).into();
            }
        }
    }
    std::fs::write(dir.join("tokenizer.json"), t.to_string()).unwrap();
}

#[test]
fn llama_3_2_11b_vision_shapes_load_count_and_run_within_memory() {
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = root.path().join("mllama-11b");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fixture("tests/data/mllama-11b-config.json"), dir.join("config.json")).unwrap();
    real_id_tokenizer(&dir);
    let shapes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tests/data/mllama-11b-shapes.json")).unwrap())
            .unwrap();
    let tensors: Vec<(String, Vec<usize>)> = shapes["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, shape)| {
            let dims = shape.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (name.clone(), dims)
        })
        .collect();
    assert_eq!(tensors.len(), 906);
    write_sparse_checkpoint(&dir, &tensors, 5);

    let inspect = Command::new(env!("CARGO_BIN_EXE_flamingo")).args(["inspect", "--model"]).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    assert!(text.contains("(mllama)"), "{text}");
    assert!(text.contains("parameters: 10,670,220,835 in 906 tensors"), "{text}");
    assert!(text.contains("cross-attention at [3, 8, 13, 18, 23, 28, 33, 38]"), "{text}");

    // A text-only prompt: the 32 self-attention layers at full width, bf16 weights mapped, not copied.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flamingo"));
    cmd.args(["generate", "--device", "cpu", "--json", "--max-new-tokens", "2", "--model"]).arg(&dir);
    cmd.args(["--prompt", "<|begin_of_text|>Hello, world"]);
    let (out, peak_anon_kb) = run_measuring(&mut cmd, "RssAnon:");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 2);
    let peak_gb = peak_anon_kb as f64 / 1e6;
    eprintln!("Llama 3.2 11B Vision shapes on CPU (text): peak anonymous memory {peak_gb:.2} GB");
    assert!(peak_gb < 4.0, "peak anonymous memory {peak_gb:.2} GB: weights are being copied, not mapped");
}

/// The sizes that shape an OpenFlamingo model with an MPT decoder (transformers' names), as `flamingo convert`
/// lays it out. The resampler (6 layers, 64 latents) and the cross-attention (8 heads x 64) are fixed in
/// OpenFlamingo's code.
struct OpenFlamingoMptSizes {
    d_model: usize,
    layers: usize,
    cross_attn_every: usize,
    vocab: usize,
    vision_width: usize,
    vision_layers: usize,
    patch: usize,
    image: usize,
    embed_dim: usize,
}

/// (name, shape) of every tensor a converted OpenFlamingo-MPT folder holds.
fn openflamingo_mpt_tensors(s: &OpenFlamingoMptSizes) -> Vec<(String, Vec<usize>)> {
    let (d, dv, inner) = (s.d_model, s.vision_width, 512);
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: String, shape: &[usize]| t.push((name, shape.to_vec()));
    let lm = "lang_encoder.transformer";
    add(format!("{lm}.wte.weight"), &[s.vocab, d]);
    add(format!("{lm}.norm_f.weight"), &[d]);
    for i in 0..s.layers {
        let b = format!("{lm}.blocks.{i}");
        add(format!("{b}.attn.Wqkv.weight"), &[3 * d, d]);
        add(format!("{b}.attn.out_proj.weight"), &[d, d]);
        add(format!("{b}.ffn.up_proj.weight"), &[4 * d, d]);
        add(format!("{b}.ffn.down_proj.weight"), &[d, 4 * d]);
        add(format!("{b}.norm_1.weight"), &[d]);
        add(format!("{b}.norm_2.weight"), &[d]);
        if (i + 1) % s.cross_attn_every == 0 {
            let x = format!("{b}.gated_cross_attn_layer");
            add(format!("{x}.attn.norm.weight"), &[d]);
            add(format!("{x}.attn.norm.bias"), &[d]);
            add(format!("{x}.attn.to_q.weight"), &[inner, d]);
            add(format!("{x}.attn.to_kv.weight"), &[2 * inner, dv]);
            add(format!("{x}.attn.to_out.weight"), &[d, inner]);
            add(format!("{x}.attn_gate"), &[1]);
            add(format!("{x}.ff.0.weight"), &[d]);
            add(format!("{x}.ff.0.bias"), &[d]);
            add(format!("{x}.ff.1.weight"), &[4 * d, d]);
            add(format!("{x}.ff.3.weight"), &[d, 4 * d]);
            add(format!("{x}.ff_gate"), &[1]);
        }
    }
    add("perceiver.latents".into(), &[64, dv]);
    add("perceiver.norm.weight".into(), &[dv]);
    add("perceiver.norm.bias".into(), &[dv]);
    for j in 0..6 {
        let a = format!("perceiver.layers.{j}");
        for n in ["norm_latents", "norm_media"] {
            add(format!("{a}.0.{n}.weight"), &[dv]);
            add(format!("{a}.0.{n}.bias"), &[dv]);
        }
        add(format!("{a}.0.to_q.weight"), &[inner, dv]);
        add(format!("{a}.0.to_kv.weight"), &[2 * inner, dv]);
        add(format!("{a}.0.to_out.weight"), &[dv, inner]);
        add(format!("{a}.1.0.weight"), &[dv]);
        add(format!("{a}.1.0.bias"), &[dv]);
        add(format!("{a}.1.1.weight"), &[4 * dv, dv]);
        add(format!("{a}.1.3.weight"), &[dv, 4 * dv]);
    }
    let v = "vision_encoder";
    let grid = s.image / s.patch;
    add(format!("{v}.class_embedding"), &[dv]);
    add(format!("{v}.conv1.weight"), &[dv, 3, s.patch, s.patch]);
    add(format!("{v}.positional_embedding"), &[grid * grid + 1, dv]);
    add(format!("{v}.proj"), &[dv, s.embed_dim]);
    for n in ["ln_pre", "ln_post"] {
        add(format!("{v}.{n}.weight"), &[dv]);
        add(format!("{v}.{n}.bias"), &[dv]);
    }
    for i in 0..s.vision_layers {
        let r = format!("{v}.transformer.resblocks.{i}");
        add(format!("{r}.attn.in_proj_weight"), &[3 * dv, dv]);
        add(format!("{r}.attn.in_proj_bias"), &[3 * dv]);
        add(format!("{r}.attn.out_proj.weight"), &[dv, dv]);
        add(format!("{r}.attn.out_proj.bias"), &[dv]);
        for n in ["ln_1", "ln_2"] {
            add(format!("{r}.{n}.weight"), &[dv]);
            add(format!("{r}.{n}.bias"), &[dv]);
        }
        add(format!("{r}.mlp.c_fc.weight"), &[4 * dv, dv]);
        add(format!("{r}.mlp.c_fc.bias"), &[4 * dv]);
        add(format!("{r}.mlp.c_proj.weight"), &[dv, 4 * dv]);
        add(format!("{r}.mlp.c_proj.bias"), &[dv]);
    }
    t
}

/// Every tensor's name and shape in a safetensors file's header.
fn safetensors_shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.tensors().into_iter().map(|(name, info)| (name, info.shape.clone())).collect()
}

/// OpenFlamingo-9B (vitl-mpt7b) at its real size in `flamingo convert`'s layout: MPT-7B (32 layers, d_model 4096,
/// 32 heads, ALiBi), a gated block before every 4th layer, open_clip's ViT-L/14 at 224, its 50,280-token vocabulary
/// (50,277 + OpenFlamingo's 3), bf16 sparse. The tensor list is first checked against what `flamingo convert`
/// writes for fixture a at its sizes; then the engine must load the 9B, count its parameters and run an image and
/// a prompt through it on the CPU with the weights mapped, not copied.
#[test]
fn openflamingo_9b_shapes_load_count_and_run_within_memory() {
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let small = root.path().join("tiny-a-converted");
    let out = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["convert", "--model"])
        .arg(fixture("tests/fixtures/tiny-openflamingo-a"))
        .arg("--output")
        .arg(&small)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tiny = OpenFlamingoMptSizes {
        d_model: 48, layers: 4, cross_attn_every: 2, vocab: 306,
        vision_width: 16, vision_layers: 2, patch: 14, image: 42, embed_dim: 16,
    };
    let listed: BTreeMap<String, Vec<usize>> = openflamingo_mpt_tensors(&tiny).into_iter().collect();
    assert_eq!(listed, safetensors_shapes(&small.join("model.safetensors")), "the list at fixture a's sizes");

    let dir = root.path().join("openflamingo-9b");
    for sub in ["lang_model", "vision_model"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::copy(small.join("config.json"), dir.join("config.json")).unwrap();
    let layout: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let vision_config = dir.join(layout["vision_config"].as_str().unwrap());
    let open_clip = serde_json::json!({"embed_dim": 768, "quick_gelu": true,
        "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}});
    std::fs::write(&vision_config, open_clip.to_string()).unwrap();
    let mut mpt: serde_json::Value =
        serde_json::from_slice(&std::fs::read(small.join("lang_model/config.json")).unwrap()).unwrap();
    for (field, value) in [("d_model", 4096), ("n_heads", 32), ("n_layers", 32), ("max_seq_len", 2048), ("vocab_size", 50432)] {
        mpt[field] = value.into();
    }
    std::fs::write(dir.join("lang_model/config.json"), mpt.to_string()).unwrap();
    // The fixture's tokenizer (ids stay below the real vocabulary).
    std::fs::copy(small.join("lang_model/tokenizer.json"), dir.join("lang_model/tokenizer.json")).unwrap();
    let real = OpenFlamingoMptSizes {
        d_model: 4096, layers: 32, cross_attn_every: 4, vocab: 50280,
        vision_width: 1024, vision_layers: 24, patch: 14, image: 224, embed_dim: 768,
    };
    let tensors = openflamingo_mpt_tensors(&real);
    write_sparse_checkpoint(&dir, &tensors, 4);
    let params: usize = tensors.iter().map(|(_, s)| s.iter().product::<usize>()).sum();

    let inspect = Command::new(env!("CARGO_BIN_EXE_flamingo")).args(["inspect", "--model"]).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let count = format!("parameters: {} in {} tensors", group_thousands(params), tensors.len());
    assert!(text.contains(&count), "{count}\n{text}");
    assert!(text.contains("decoder: Transformers MPT, 32 layers, d_model 4096, 32 heads x 128, MLP 16384"), "{text}");
    assert!(text.contains("image 224 / patch 14 -> 256 patch tokens, QuickGELU"), "{text}");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flamingo"));
    cmd.args(["generate", "--device", "cpu", "--json", "--max-new-tokens", "2", "--model"]).arg(&dir);
    cmd.args(["--prompt", "<image>An image of", "--image"]).arg(fixture("tests/fixtures/images/rocket.jpg"));
    let (out, peak_anon_kb) = run_measuring(&mut cmd, "RssAnon:");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 2);
    let peak_gb = peak_anon_kb as f64 / 1e6;
    eprintln!("OpenFlamingo-9B shapes on CPU: {params} parameters, peak anonymous memory {peak_gb:.2} GB");
    assert!(peak_gb < 4.0, "peak anonymous memory {peak_gb:.2} GB: weights are being copied, not mapped");
}

/// `8131000000` -> `8,131,000,000`, as `flamingo inspect` prints counts.
fn group_thousands(n: usize) -> String {
    let digits: Vec<char> = n.to_string().chars().rev().collect();
    let groups: Vec<String> = digits.chunks(3).map(|g| g.iter().rev().collect()).collect();
    groups.into_iter().rev().collect::<Vec<_>>().join(",")
}
