//! Bad input never panics: each case exits non-zero with a message naming the file, tensor, field or token, and,
//! where there is one, the expected and the actual value.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture_dir;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A writable copy of fixture `tiny-idefics-a` (f32, one `model.safetensors`).
fn model_copy() -> (tempfile::TempDir, PathBuf) {
    fixture_copy("tiny-idefics-a")
}

/// A writable copy of a fixture model directory.
fn fixture_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        let mut perms = std::fs::metadata(dir.join(p.file_name().unwrap())).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(dir.join(p.file_name().unwrap()), perms).unwrap();
    }
    (tmp, dir)
}

/// Rewrites a fixture copy's config.json through `edit`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    edit_json(&dir.join("config.json"), edit)
}

/// Rewrites a JSON file through `edit`.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

fn image() -> PathBuf {
    fixture_dir("tiny-idefics-a").join("chelsea.png")
}

/// Runs `flamingo generate` and returns stderr, asserting a clean failure.
fn generate_fails(model: &Path, prompt: &str, images: &[PathBuf], extra: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flamingo"));
    cmd.args(["generate", "--max-new-tokens", "2", "--model"])
        .arg(model)
        .args(["--prompt", prompt]);
    for img in images {
        cmd.arg("--image").arg(img);
    }
    cmd.args(extra);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure, got success; stdout {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "panic instead of an error: {stderr}"
    );
    // `--device auto` (the default) notes the device it picked on the first line.
    let first = stderr
        .lines()
        .find(|l| !l.starts_with("note: "))
        .unwrap_or_default();
    assert!(first.starts_with("error: "), "{stderr}");
    stderr
}

fn assert_mentions(stderr: &str, parts: &[&str]) {
    for p in parts {
        assert!(stderr.contains(p), "error message lacks {p:?}: {stderr}");
    }
}

/// Rewrites `model.safetensors` after `edit` changes the (name -> (dtype, shape, bytes)) map.
fn rewrite_weights(
    dir: &Path,
    edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: Vec<(String, TensorView)> = map
        .iter()
        .map(|(n, (dt, shape, data))| {
            (
                n.clone(),
                TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

const PROMPT: &str = "User:<image>Describe this image.\nAssistant:";
const Q_PROJ: &str = "model.layers.1.self_attn.q_proj.weight";

#[test]
fn truncated_safetensors() {
    let (_t, dir) = model_copy();
    let f = dir.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    let err = generate_fails(&dir, PROMPT, &[image()], &[]);
    assert_mentions(&err, &["model.safetensors", "truncated"]);
}

#[test]
fn corrupt_safetensors_header() {
    let (_t, dir) = model_copy();
    let f = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&f, bytes).unwrap();
    let err = generate_fails(&dir, PROMPT, &[image()], &[]);
    assert_mentions(&err, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn tiny_file_that_is_not_safetensors() {
    let (_t, dir) = model_copy();
    std::fs::write(dir.join("model.safetensors"), b"abc").unwrap();
    let err = generate_fails(&dir, PROMPT, &[image()], &[]);
    assert_mentions(&err, &["model.safetensors", "3 bytes"]);
}

#[test]
fn missing_tensor() {
    let (_t, dir) = model_copy();
    rewrite_weights(&dir, |m| {
        m.remove(Q_PROJ);
    });
    let err = generate_fails(&dir, PROMPT, &[image()], &[]);
    assert_mentions(&err, &[Q_PROJ, "not found", "model.safetensors"]);
}

#[test]
fn tensor_of_the_wrong_shape() {
    let (_t, dir) = model_copy();
    rewrite_weights(&dir, |m| m.get_mut(Q_PROJ).unwrap().1 = vec![32, 128]);
    let err = generate_fails(&dir, PROMPT, &[image()], &[]);
    assert_mentions(&err, &[Q_PROJ, "[32, 128]", "expected [64, 64]"]);
}

#[test]
fn tensor_of_the_wrong_dtype() {
    let (_t, dir) = model_copy();
    rewrite_weights(&dir, |m| m.get_mut(Q_PROJ).unwrap().0 = Dtype::I32);
    let err = generate_fails(&dir, PROMPT, &[image()], &[]);
    assert_mentions(&err, &[Q_PROJ, "I32", "F32, BF16, F16"]);
}

#[test]
fn config_that_contradicts_the_weights() {
    let (_t, dir) = model_copy();
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["intermediate_size"] = 100.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = generate_fails(&dir, PROMPT, &[image()], &[]);
    assert_mentions(
        &err,
        &[
            "mlp.gate_proj.weight",
            "[176, 64]",
            "expected [100, 64]",
            "config.json",
        ],
    );
}

#[test]
fn invalid_config_field() {
    let (_t, dir) = model_copy();
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["alpha_type"] = "matrix".into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = generate_fails(&dir, PROMPT, &[image()], &[]);
    assert_mentions(&err, &["config.json", "alpha_type", "matrix"]);
}

#[test]
fn missing_tokenizer() {
    let (_t, dir) = model_copy();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = generate_fails(&dir, PROMPT, &[image()], &[]);
    assert_mentions(&err, &["tokenizer.json", "not found"]);
}

#[test]
fn missing_model_directory() {
    let err = generate_fails(Path::new("/nonexistent/idefics"), PROMPT, &[image()], &[]);
    assert_mentions(&err, &["/nonexistent/idefics", "not found"]);
}

#[test]
fn unreadable_image() {
    let (t, dir) = model_copy();
    let bogus = t.path().join("notes.png");
    std::fs::write(&bogus, b"this is not a picture").unwrap();
    let err = generate_fails(&dir, PROMPT, &[bogus], &[]);
    assert_mentions(&err, &["notes.png", "image"]);
}

#[test]
fn zero_size_image() {
    let (t, dir) = model_copy();
    let empty = t.path().join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let err = generate_fails(&dir, PROMPT, &[empty], &[]);
    assert_mentions(&err, &["empty.jpg", "0 bytes"]);
}

#[test]
fn missing_image_file() {
    let (_t, dir) = model_copy();
    let err = generate_fails(&dir, PROMPT, &[PathBuf::from("/nonexistent/cat.png")], &[]);
    assert_mentions(&err, &["/nonexistent/cat.png"]);
}

#[test]
fn image_over_the_pixel_limit() {
    let (_t, dir) = model_copy();
    let err = generate_fails(&dir, PROMPT, &[image()], &["--max-image-pixels", "1000"]);
    assert_mentions(&err, &["chelsea.png", "over the limit of 1000"]);
}

#[test]
fn more_markers_than_images() {
    let (_t, dir) = model_copy();
    let err = generate_fails(&dir, "<image> and <image>", &[image()], &[]);
    assert_mentions(&err, &["2 `<image>` marker(s)", "1 image(s)"]);
}

#[test]
fn fewer_markers_than_images() {
    let (_t, dir) = model_copy();
    let err = generate_fails(&dir, "no marker here", &[image()], &[]);
    assert_mentions(&err, &["0 `<image>` marker(s)", "1 image(s)"]);
}

#[test]
fn prompt_longer_than_the_context() {
    let (_t, dir) = model_copy();
    let long = format!(
        "<image>{}",
        "The quick brown fox jumps over the lazy dog. ".repeat(60)
    );
    let err = generate_fails(&dir, &long, &[image()], &[]);
    assert_mentions(
        &err,
        &[
            "over the model's context of 256",
            "max_position_embeddings",
            "config.json",
        ],
    );
}

#[test]
fn token_beyond_the_embedding_rows() {
    // Like idefics-*-instruct: the tokenizer knows `<end_of_utterance>` but the weights have no row for it.
    let (_t, dir) = model_copy();
    let path = dir.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tok["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
        "id": 162, "content": "<end_of_utterance>", "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": true
    }));
    std::fs::write(&path, tok.to_string()).unwrap();
    let err = generate_fails(&dir, "<image>Hi<end_of_utterance>", &[image()], &[]);
    assert_mentions(
        &err,
        &["token id 162", "<end_of_utterance>", "162 embedding rows"],
    );
}

#[test]
fn unknown_device() {
    let (_t, dir) = model_copy();
    let err = generate_fails(&dir, PROMPT, &[image()], &["--device", "tpu"]);
    assert_mentions(&err, &["tpu", "cpu"]);
}

#[test]
fn unknown_dtype() {
    let (_t, dir) = model_copy();
    let out = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["generate", "--device", "cpu", "--dtype", "f32", "--model"])
        .arg(&dir)
        .args(["--prompt", PROMPT])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_mentions(&stderr, &["--dtype", "f32", "bf16, f16"]);
}

#[test]
fn invalid_sampling_parameters() {
    let (_t, dir) = model_copy();
    let err = generate_fails(&dir, PROMPT, &[image()], &["--top-p", "1.5"]);
    assert_mentions(&err, &["top_p", "1.5"]);
}

/// Runs `flamingo batch` over one good line with `flags` and returns stderr, asserting a clean failure.
fn batch_fails(flags: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"User: hi\\nAssistant:\", \"max_new_tokens\": 2}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["batch", "--device", "cpu", "--model"])
        .arg(fixture_dir("tiny-idefics-a"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(tmp.path().join("out.jsonl"))
        .args(flags)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{flags:?}: {stderr}");
    stderr
}

#[test]
fn engine_flags_out_of_range_are_refused_by_name() {
    for (flags, expected) in [
        (&["--block-size", "0"][..], "--block-size 0 is out of range"),
        (
            &["--block-size", "18446744073709551615"],
            "--block-size 18446744073709551615 is out of range",
        ),
        (
            &["--max-seqs", "4611686018427387904"],
            "--max-seqs 4611686018427387904 is out of range",
        ),
        (
            &["--max-step-tokens", "0"],
            "--max-step-tokens 0 is out of range",
        ),
        (
            &["--kv-memory-mib", "1125899906842624"],
            "--kv-memory-mib 1125899906842624",
        ),
        (&["--kv-blocks", "200000000"], "more than the"),
        (
            &["--media-slots", "1048577"],
            "--media-slots 1048577 is out of range",
        ),
        (&["--threads", "100000"], "--threads 100000 is out of range"),
    ] {
        let err = batch_fails(flags);
        assert!(err.contains(expected), "{flags:?}: {err}");
    }
}

#[test]
fn a_max_new_tokens_near_the_integer_limit_stops_at_the_context() {
    for n in ["18446744073709551597", "18446744073709551615"] {
        let cmd = generate_json(n);
        // The bug this guards against spun forever: a run past a minute is a failure, not a hang.
        let out = output_within(cmd, std::time::Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{n}: {stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let context = 256; // tiny-idefics-a's max_position_embeddings
        let generated = v["generated_ids"].as_array().unwrap().len();
        let total = v["prompt_ids"].as_array().unwrap().len() + generated;
        assert!(
            generated >= 1 && total <= context + 1,
            "{n}: {total} positions"
        );
        if v["finish_reason"] == "length" {
            assert!(
                total >= context,
                "{n}: stopped for length after {generated} tokens"
            );
        }
    }
}

/// Runs `cmd` to completion, killing it (and failing) if it takes longer than `limit`.
fn output_within(mut cmd: Command, limit: std::time::Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            panic!("still running after {limit:?}: {cmd:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Sets `pointer` (a JSON pointer) in `file` of a fresh model copy to `value`, and returns generate's stderr.
fn with_field(file: &str, pointer: &str, value: serde_json::Value) -> String {
    let (_t, dir) = model_copy();
    let path = dir.join(file);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    *json
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{file} has {pointer}")) = value;
    std::fs::write(&path, json.to_string()).unwrap();
    generate_fails(&dir, PROMPT, &[image()], &[])
}

#[test]
fn numbers_outside_their_domain_are_refused_at_load() {
    for (file, pointer, value, field) in [
        (
            "config.json",
            "/rms_norm_eps",
            json_num(0.0),
            "rms_norm_eps",
        ),
        (
            "config.json",
            "/rms_norm_eps",
            json_num(-1e-6),
            "rms_norm_eps",
        ),
        (
            "config.json",
            "/vision_config/layer_norm_eps",
            json_num(0.0),
            "layer_norm_eps",
        ),
        (
            "config.json",
            "/rope_parameters/rope_theta",
            json_num(0.0),
            "rope_theta",
        ),
        (
            "config.json",
            "/rope_parameters/rope_theta",
            json_num(-10.0),
            "rope_theta",
        ),
        (
            "preprocessor_config.json",
            "/image_std",
            serde_json::json!([1e-45, 0.5, 0.5]),
            "image_std",
        ),
        (
            "preprocessor_config.json",
            "/image_std",
            serde_json::json!([0.5, -0.5, 0.5]),
            "image_std",
        ),
    ] {
        let err = with_field(file, pointer, value);
        assert_mentions(&err, &[file, field]);
    }
    let (_t, dir) = model_copy();
    let path = dir.join("preprocessor_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["rescale_factor"] = json_num(0.0);
    std::fs::write(&path, json.to_string()).unwrap();
    let err = generate_fails(&dir, PROMPT, &[image()], &[]);
    assert_mentions(&err, &["preprocessor_config.json", "rescale_factor"]);
}

fn json_num(x: f64) -> serde_json::Value {
    serde_json::Value::from(x)
}

#[test]
fn a_temperature_below_the_floor_is_greedy() {
    let run = |extra: &[&str]| {
        let out = generate_json("6").args(extra).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["generated_ids"].clone()
    };
    assert_eq!(run(&["--temperature", "1e-45", "--seed", "3"]), run(&[]));
}

#[test]
fn a_request_whose_logits_leave_nothing_to_sample_fails_alone() {
    // NaN cross-attention keys: every row that sees an image gets NaN logits (nothing to sample at a temperature);
    // rows of a text-only request never read them. Both requests share each step, so the engine must fail the
    // first without failing the second.
    let (t, dir) = model_copy();
    rewrite_weights(&dir, |w| {
        let (_, _, data) = w
            .get_mut("model.gated_cross_attn_layers.0.cross_attn.k_proj.weight")
            .unwrap();
        for v in data.chunks_mut(4) {
            v.copy_from_slice(&f32::NAN.to_le_bytes());
        }
    });
    std::fs::copy(image(), t.path().join("chelsea.png")).unwrap();
    let input = t.path().join("in.jsonl");
    let lines = [
        serde_json::json!({"prompt": PROMPT, "images": ["chelsea.png"], "max_new_tokens": 3,
                           "temperature": 0.7}),
        serde_json::json!({"prompt": "User: hello\nAssistant:", "max_new_tokens": 3}),
    ];
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&input, text.join("\n")).unwrap();
    let output = t.path().join("out.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["batch", "--device", "cpu", "--skip-weight-check", "--model"])
        .arg(&dir)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let results: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let error = results[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("line 1") && error.contains("nothing to sample"),
        "{}",
        results[0]
    );
    assert_eq!(
        results[1]["generated_ids"].as_array().map(Vec::len),
        Some(3),
        "{}",
        results[1]
    );
}

#[test]
fn non_finite_weights_are_refused_at_load_naming_the_tensor() {
    for (value, what) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
    ] {
        let (_t, dir) = model_copy();
        rewrite_weights(&dir, |w| {
            let (_, _, data) = w.get_mut(Q_PROJ).unwrap();
            data[40..44].copy_from_slice(&value.to_le_bytes());
        });
        let err = generate_fails(&dir, PROMPT, &[image()], &[]);
        assert_mentions(
            &err,
            &["model.safetensors", Q_PROJ, "element 10", "NaN or infinite", "--skip-weight-check"],
        );
        // The opt-out loads it (the poisoned logits are then the user's to see).
        let out = Command::new(env!("CARGO_BIN_EXE_flamingo"))
            .args(["generate", "--device", "cpu", "--json", "--max-new-tokens", "1", "--skip-weight-check"])
            .arg("--model")
            .arg(&dir)
            .args(["--prompt", PROMPT, "--image"])
            .arg(image())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("NaN or infinite"), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
}

#[test]
fn model_files_that_are_not_regular_files_are_refused_not_waited_on() {
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        let (_t, dir) = model_copy();
        let path = dir.join(name);
        std::fs::remove_file(&path).unwrap();
        assert!(Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap()
            .success());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flamingo"));
        cmd.args([
            "generate",
            "--device",
            "cpu",
            "--max-new-tokens",
            "2",
            "--model",
        ])
        .arg(&dir)
        .args(["--prompt", PROMPT, "--image"])
        .arg(image());
        let out = output_within(cmd, std::time::Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert_mentions(&stderr, &[name, "not a regular file"]);
    }
}

/// `flamingo generate --json` on the CPU over the tiny fixture, its picture and the test prompt.
fn generate_json(max_new_tokens: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flamingo"));
    cmd.args([
        "generate",
        "--device",
        "cpu",
        "--json",
        "--max-new-tokens",
        max_new_tokens,
    ])
    .arg("--model")
    .arg(fixture_dir("tiny-idefics-a"))
    .args(["--prompt", PROMPT, "--image"])
    .arg(image());
    cmd
}

#[test]
fn mllama_prompt_with_more_or_fewer_image_tokens_than_images() {
    let dir = fixture_dir("tiny-mllama-a");
    let img = dir.join("chelsea_wide.png");
    let err = generate_fails(&dir, "<|image|><|image|>Two?", std::slice::from_ref(&img), &[]);
    assert_mentions(&err, &["2 `<|image|>` token(s)", "1 image(s)"]);
    let err = generate_fails(&dir, "No image token here.", &[img], &[]);
    assert_mentions(&err, &["0 `<|image|>` token(s)", "1 image(s)"]);
}

#[test]
fn mllama_cross_attention_layer_out_of_range() {
    let (_tmp, dir) = fixture_copy("tiny-mllama-a");
    edit_config(&dir, |c| c["text_config"]["cross_attention_layers"] = serde_json::json!([1, 5]));
    let err = generate_fails(&dir, "<|begin_of_text|>Hi", &[], &[]);
    assert_mentions(&err, &["config.json", "text_config.cross_attention_layers", "layer 5", "5 layers"]);
}

#[test]
fn unknown_model_type() {
    let (_tmp, dir) = fixture_copy("tiny-mllama-a");
    edit_config(&dir, |c| c["model_type"] = "llava".into());
    let err = generate_fails(&dir, "Hi", &[], &[]);
    assert_mentions(&err, &["config.json", "model_type", "\"llava\"", "idefics, mllama"]);
}

#[test]
fn mllama_chat_without_a_template_in_the_model() {
    let (_tmp, dir) = fixture_copy("tiny-mllama-a");
    std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
    edit_json(&dir.join("tokenizer_config.json"), |c| {
        c.as_object_mut().unwrap().remove("chat_template");
    });
    let err = generate_fails(&dir, "Hi", &[], &["--chat"]);
    assert_mentions(&err, &["--chat", "no chat template"]);
}
