//! OpenFlamingo through the binary as a user runs it, on the CPU, from the fixture folders as they ship
//! (checkpoint.pt, the language model's directory, open_clip's tower) and the image files: `generate` gives
//! OpenFlamingo's greedy ids, `batch` runs the evaluation's few-shot prompts together, `score` equals the summed
//! log-probabilities of OpenFlamingo's own float64 logits, a hub tokenizer gets OpenFlamingo's added tokens,
//! `convert` writes one safetensors folder that gives the same ids, and mistakes are named.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::openflamingo::image_files;
use common::{fixture_dir, json_of, Fixture};
use serde_json::{json, Value};

const FIXTURES: [&str; 3] = ["tiny-openflamingo-a", "tiny-openflamingo-b", "tiny-openflamingo-c"];

fn flamingo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flamingo"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The fixture's prompt and what OpenFlamingo's generate gave for it.
fn golden(name: &str) -> (String, Value) {
    let meta: Value = serde_json::from_slice(&std::fs::read(fixture_dir(name).join("golden.json")).unwrap()).unwrap();
    (meta["prompt"].as_str().unwrap().to_string(), meta)
}

/// `flamingo generate --json` on the OpenFlamingo folder `model` (its parts found as its subfolders).
fn generate(model: &Path, prompt: &str, images: &[PathBuf], new_tokens: usize, extra: &[&str]) -> Output {
    let mut cmd = flamingo();
    cmd.args(["generate", "--device", "cpu", "--json", "--model"]).arg(model);
    cmd.args(["--prompt", prompt, "--max-new-tokens", &new_tokens.to_string()]).args(extra);
    for image in images {
        cmd.arg("--image").arg(image);
    }
    cmd.output().unwrap()
}

#[test]
fn generate_from_the_image_files_gives_openflamingos_greedy_ids_and_text() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let (prompt, meta) = golden(name);
        let want = fx.ids("generated_ids");
        let v = json_of(&generate(&fx.dir, &prompt, &image_files(name), want.len(), &[]));
        assert_eq!(ids(&v["prompt_ids"]), fx.ids("input_ids"), "{name}: no BOS, OpenFlamingo's added tokens");
        assert_eq!(ids(&v["generated_ids"]), want, "{name}: generated_ids");
        assert_eq!(v["text"], meta["generated_text"], "{name}: text");
    }
}

/// Runs `flamingo <command>` (batch or score) on CPU over `lines` as its JSON-lines input and returns its output
/// lines.
fn jsonl_command(command: &str, model: &Path, lines: &[Value], flags: &[&str]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&input, text.join("\n")).unwrap();
    let out = flamingo()
        .args([command, "--device", "cpu", "--model"])
        .arg(model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(flags)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn batch_runs_few_shot_prompts_together_as_generate_runs_each_alone() {
    let name = "tiny-openflamingo-b";
    let fx = Fixture::load(name);
    let (prompt, _) = golden(name);
    let images = image_files(name);
    // The evaluation's formats: 1-shot (the golden prompt), 0-shot, the same support example twice, and one
    // line whose markers do not match its images (answered in place).
    let zero_shot = "<image>Output:";
    let two_shot = "<image>Output: a cat.<|endofchunk|><image>Output: a cat.<|endofchunk|><image>Output:";
    let requests: Vec<(&str, Vec<PathBuf>)> = vec![
        (&prompt, images.clone()),
        (zero_shot, vec![images[1].clone()]),
        (two_shot, vec![images[0].clone(), images[0].clone(), images[1].clone()]),
        (zero_shot, images.clone()),
    ];
    let lines: Vec<Value> = requests
        .iter()
        .map(|(p, im)| json!({"prompt": p, "images": im, "max_tokens": 10, "temperature": 0}))
        .collect();
    let results = jsonl_command("batch", &fx.dir, &lines, &["--block-size", "4"]);
    assert_eq!(ids(&results[0]["generated_ids"]), fx.ids("generated_ids"), "{}", results[0]);
    for (k, (p, im)) in requests.iter().enumerate().take(3).skip(1) {
        let alone = json_of(&generate(&fx.dir, p, im, 10, &[]));
        assert_eq!(results[k]["generated_ids"], alone["generated_ids"], "line {}", k + 1);
    }
    let error = results[3]["error"].as_str().unwrap_or_else(|| panic!("{}", results[3]));
    assert!(error.contains("1 `<image>` token(s) but 2 image(s)"), "{error}");
}

/// `log_softmax(row)[id]` in float64.
fn log_prob(row: &[f64], id: u32) -> f64 {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = row.iter().map(|&x| (x - max).exp()).sum();
    row[id as usize] - max - sum.ln()
}

/// Each fixture's prompt split where its last text begins: the prefix, the golden rest as one candidate (its
/// log-probability summed over OpenFlamingo's logits of the golden prompt), and every single token as the other
/// candidates (each from the logits row before the rest).
#[test]
fn score_equals_the_summed_log_probabilities_of_openflamingos_logits() {
    for (name, rest, others) in [
        ("tiny-openflamingo-a", " image of", [" of", " image"]),
        ("tiny-openflamingo-b", "Output:", ["Output", ":"]),
        ("tiny-openflamingo-c", " cup of", [" of", " a"]),
    ] {
        let fx = Fixture::load(name);
        let (prompt, _) = golden(name);
        let prefix = prompt.strip_suffix(rest).unwrap();
        let input_ids = fx.ids("input_ids");
        let logits = fx.get("logits");
        let vocab = logits.shape[1];
        let row = |i: usize| &logits.data[i * vocab..(i + 1) * vocab];
        let line = json!({"images": image_files(name), "prompt": prefix, "candidates": [rest, others[0], others[1]]});
        let result = jsonl_command("score", &fx.dir, &[line], &[]).remove(0);
        let scores = result["scores"].as_array().unwrap_or_else(|| panic!("{name}: {result}"));
        let n_rest = scores[0]["tokens"].as_u64().unwrap() as usize;
        let first = input_ids.len() - n_rest;
        let want_rest: f64 = (first..input_ids.len()).map(|i| log_prob(row(i - 1), input_ids[i])).sum();
        let mut want = vec![want_rest];
        for other in others {
            let id = flamingo_token_id(&fx.dir, other);
            want.push(log_prob(row(first - 1), id));
        }
        for (k, w) in want.iter().enumerate() {
            let got = scores[k]["logprob"].as_f64().unwrap();
            assert!((got - w).abs() < 2e-4 * w.abs().max(1.0), "{name} candidate {k}: {got} vs OpenFlamingo's {w}");
        }
        let mut order: Vec<usize> = (0..3).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
        assert_eq!(ids(&result["ranking"]), order.iter().map(|&k| k as u32).collect::<Vec<_>>(), "{name}");
    }
}

/// The id of a text that is one token, through the engine's own tokenizer for the model.
fn flamingo_token_id(model: &Path, text: &str) -> u32 {
    let files = flamingo::runtime::pipeline::ModelFiles::open(model).unwrap();
    let encoded = files.tokenizer.encode(text).unwrap();
    assert_eq!(encoded.len(), 1, "{text:?} is one token");
    encoded[0]
}

/// Copies fixture `name` into `to` (the folder the test then changes).
fn copy_fixture(name: &str, to: &Path) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            match path.is_dir() {
                true => copy(&path, &target),
                false => drop(std::fs::copy(&path, &target).unwrap()),
            }
        }
    }
    copy(&fixture_dir(name), to);
}

#[test]
fn a_hub_tokenizer_without_openflamingos_tokens_gets_them_where_openflamingo_puts_them() {
    let name = "tiny-openflamingo-b";
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join(name);
    copy_fixture(name, &model);
    let lang = model.join("RedPajama-INCITE-Base-3B-v1");
    // The hub's files: no <|endofchunk|>, <image> or <PAD>, no pad token declared.
    let path = lang.join("tokenizer.json");
    let mut tokenizer: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let added = tokenizer["added_tokens"].as_array_mut().unwrap();
    let before = added.len();
    added.retain(|t| !["<|endofchunk|>", "<image>", "<PAD>"].contains(&t["content"].as_str().unwrap()));
    assert_eq!(added.len(), before - 3);
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = lang.join(file);
        let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("pad_token");
        v.as_object_mut().unwrap().remove("additional_special_tokens");
        std::fs::write(&path, v.to_string()).unwrap();
    }
    let files = flamingo::runtime::pipeline::ModelFiles::open(&model).unwrap();
    let tok = &files.tokenizer;
    assert_eq!((tok.eos_id, tok.image_id), (303, 304), "<|endofchunk|>, <image>");
    assert_eq!(tok.encode("<PAD>").unwrap(), vec![305]);
    assert_eq!(tok.stop_ids, vec![303], "<|endofchunk|> stops generation, <|endoftext|> does not");
    assert_eq!(tok.banned_ids, vec![304], "<image> is never generated");
    let fx = Fixture::load(name);
    let (prompt, _) = golden(name);
    let v = json_of(&generate(&model, &prompt, &image_files(name), 10, &[]));
    assert_eq!(ids(&v["prompt_ids"]), fx.ids("input_ids"));
    assert_eq!(ids(&v["generated_ids"]), fx.ids("generated_ids"));
}

/// OpenFlamingo's `text_time` (`media_locations` cumulated): a token sees the latest image at or before it, text
/// after a chunk's end still its image (the fixtures' prompts always start an image right after one), consecutive
/// images never together.
#[test]
fn each_token_sees_only_the_latest_image_at_or_before_it() {
    let files = flamingo::runtime::pipeline::ModelFiles::open(&fixture_dir("tiny-openflamingo-b")).unwrap();
    let text = "x<image>a<|endofchunk|>b<image><image>c";
    let p = flamingo::io::prompt::encode_openflamingo_prompt(&files.tokenizer, text, 3).unwrap();
    let tokens: Vec<String> = p.ids.iter().map(|&id| files.tokenizer.token(id)).collect();
    assert_eq!(tokens, ["x", "<image>", "a", "<|endofchunk|>", "b", "<image>", "<image>", "c"]);
    assert_eq!(p.image_of_token, [-1, 0, 0, 0, 0, 1, 2, 2]);
    assert_eq!(p.joins_previous, [false, false, false]);
}

#[test]
fn convert_writes_one_safetensors_folder_that_runs_as_the_released_parts_do() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let out = tmp.path().join(name);
        let convert = |from: &Path| flamingo().args(["convert", "--model"]).arg(from).arg("--output").arg(&out).output().unwrap();
        let done = convert(&fx.dir);
        assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
        assert!(out.join("model.safetensors").is_file());
        let (prompt, _) = golden(name);
        let want = fx.ids("generated_ids");
        let v = json_of(&generate(&out, &prompt, &image_files(name), want.len(), &[]));
        assert_eq!(ids(&v["prompt_ids"]), fx.ids("input_ids"), "{name} converted");
        assert_eq!(ids(&v["generated_ids"]), want, "{name} converted");
        let err = stderr_of(&convert(&fx.dir));
        assert!(err.contains("exists and is not empty"), "{err}");
        let again = tmp.path().join(format!("{name}-again"));
        let err = stderr_of(&flamingo().args(["convert", "--model"]).arg(&out).arg("--output").arg(&again).output().unwrap());
        assert!(err.contains("already converted"), "{err}");
    }
    // A converted folder whose config points outside itself is refused, naming the field.
    let out = tmp.path().join("tiny-openflamingo-a");
    let config = out.join("config.json");
    let mut layout: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    layout["lang_model"] = json!("../tiny-openflamingo-b/lang_model");
    std::fs::write(&config, layout.to_string()).unwrap();
    let (prompt, _) = golden("tiny-openflamingo-a");
    let err = stderr_of(&generate(&out, &prompt, &image_files("tiny-openflamingo-a"), 1, &[]));
    assert!(err.contains("lang_model") && err.contains("not a path inside the folder"), "{err}");
    let idefics = fixture_dir("tiny-idefics-a");
    let err = stderr_of(&flamingo().args(["convert", "--model"]).arg(&idefics).arg("--output").arg(tmp.path().join("x")).output().unwrap());
    assert!(err.contains("is an idefics model directory"), "{err}");
}

fn stderr_of(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn parts_given_by_flag_work_and_mistakes_are_named() {
    let name = "tiny-openflamingo-a";
    let fx = Fixture::load(name);
    let (prompt, _) = golden(name);
    let images = image_files(name);
    // The parts elsewhere, given by flag.
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture(name, tmp.path());
    let (lang, vision) = (tmp.path().join("mpt-7b"), tmp.path().join("open_clip"));
    let alone = tmp.path().join("alone");
    std::fs::create_dir(&alone).unwrap();
    std::fs::rename(tmp.path().join("checkpoint.pt"), alone.join("checkpoint.pt")).unwrap();
    let flags = ["--lang-model", lang.to_str().unwrap(), "--vision-model", vision.to_str().unwrap()];
    let v = json_of(&generate(&alone, &prompt, &images, 8, &flags));
    assert_eq!(ids(&v["generated_ids"]), fx.ids("generated_ids"));
    let err = stderr_of(&generate(&alone, &prompt, &images, 8, &flags[..2]));
    assert!(err.contains("--vision-model"), "{err}");
    let err = stderr_of(&generate(&alone, &prompt, &images, 8, &[]));
    assert!(err.contains("--lang-model"), "{err}");
    // Flags that mean nothing for a Hugging Face directory are refused, not ignored.
    let idefics = fixture_dir("tiny-idefics-a");
    let err = stderr_of(&generate(&idefics, "<image>x", &images, 1, &flags[..2]));
    assert!(err.contains("--lang-model is for OpenFlamingo folders"), "{err}");
    // Markers and images disagree.
    let err = stderr_of(&generate(&fx.dir, "<image><image>An image of", &images, 1, &[]));
    assert!(err.contains("2 `<image>` token(s) but 1 image(s)"), "{err}");
}
