//! The binary as a user runs it: golden ids through `flamingo generate --json`, the bundled default, `inspect`.

mod common;

use std::process::Command;

use common::{json_of, Fixture, FIXTURES};

fn flamingo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flamingo"))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn generate_json_prints_the_golden_ids_for_every_fixture() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let want = fx.ids("generated_ids");
        let mut cmd = flamingo();
        cmd.args(["generate", "--device", "cpu", "--json", "--model"])
            .arg(&fx.dir);
        cmd.args([
            "--prompt",
            &fx.meta.cli_prompt,
            "--max-new-tokens",
            &want.len().to_string(),
        ]);
        for img in fx.image_paths() {
            cmd.arg("--image").arg(img);
        }
        let v = json_of(&cmd.output().unwrap());
        assert_eq!(
            ids(&v["prompt_ids"]),
            fx.ids("input_ids"),
            "{name}: prompt_ids"
        );
        assert_eq!(ids(&v["generated_ids"]), want, "{name}: generated_ids");
        assert!(v["text"].is_string());
    }
}

/// The bundled example picture's true caption (tools/demo_model/shapes.py drew it, `--examples-seed` 3003).
const SHAPES_PNG_CAPTION: &str = "a brown circle, an orange triangle and an orange square.";

#[test]
fn generate_with_no_arguments_describes_the_bundled_image() {
    let out = flamingo().args(["generate"]).output().unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{SHAPES_PNG_CAPTION}\n")
    );
    let out = flamingo().args(["generate", "--json"]).output().unwrap();
    let v = json_of(&out);
    assert_eq!(v["text"], SHAPES_PNG_CAPTION);
    assert_eq!(
        v["finish_reason"], "stop",
        "the model ends its answer itself"
    );
}

#[test]
fn streamed_stdout_equals_the_json_text() {
    let fx = Fixture::load("tiny-idefics-b");
    let run = |json: bool| {
        let mut cmd = flamingo();
        cmd.args(["generate", "--model"]).arg(&fx.dir).args([
            "--prompt",
            &fx.meta.cli_prompt,
            "--max-new-tokens",
            "10",
        ]);
        for img in fx.image_paths() {
            cmd.arg("--image").arg(img);
        }
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };
    let text = json_of(&run(true))["text"].as_str().unwrap().to_string();
    let streamed = run(false);
    assert!(streamed.status.success());
    assert_eq!(
        String::from_utf8_lossy(&streamed.stdout),
        format!("{text}\n")
    );
}

#[test]
fn stop_strings_cut_the_text() {
    let fx = Fixture::load("tiny-idefics-a");
    let full = {
        let out = flamingo()
            .args(["generate", "--json", "--max-new-tokens", "8", "--model"])
            .arg(&fx.dir)
            .args(["--prompt", &fx.meta.cli_prompt, "--image"])
            .arg(&fx.image_paths()[0])
            .output()
            .unwrap();
        json_of(&out)["text"].as_str().unwrap().to_string()
    };
    let stop: String = full.chars().skip(2).take(2).collect();
    assert_eq!(
        stop.chars().count(),
        2,
        "golden text too short for this test: {full:?}"
    );
    let out = flamingo()
        .args([
            "generate",
            "--json",
            "--max-new-tokens",
            "8",
            "--stop",
            &stop,
            "--model",
        ])
        .arg(&fx.dir)
        .args(["--prompt", &fx.meta.cli_prompt, "--image"])
        .arg(&fx.image_paths()[0])
        .output()
        .unwrap();
    let v = json_of(&out);
    let cut = v["text"].as_str().unwrap();
    assert_eq!(cut, &full[..full.find(&stop).unwrap()]);
    assert_eq!(v["finish_reason"], "stop");
}

#[test]
fn seeded_sampling_is_reproducible() {
    // A random-weight fixture: its next-token distributions are flat enough for two seeds to differ (the trained
    // bundled model is too sure of its captions for that).
    let fx = Fixture::load("tiny-idefics-a");
    let run = |seed: &str| {
        let out = flamingo()
            .args([
                "generate",
                "--json",
                "--max-new-tokens",
                "12",
                "--temperature",
                "1.0",
                "--top-k",
                "20",
            ])
            .args(["--top-p", "0.95", "--seed", seed, "--model"])
            .arg(&fx.dir)
            .args(["--prompt", &fx.meta.cli_prompt, "--image"])
            .arg(&fx.image_paths()[0])
            .output()
            .unwrap();
        ids(&json_of(&out)["generated_ids"])
    };
    assert_eq!(run("3"), run("3"));
    assert_ne!(
        run("3"),
        run("4"),
        "different seeds gave the same 12 sampled tokens"
    );
}

#[test]
fn inspect_counts_every_parameter() {
    let fx = Fixture::load("tiny-idefics-b");
    let out = flamingo()
        .args(["inspect", "--json", "--model"])
        .arg(&fx.dir)
        .output()
        .unwrap();
    let v = json_of(&out);
    // Sum of the safetensors headers, computed independently here.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fx.dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut files: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|f| f.as_str().unwrap())
        .collect();
    files.sort();
    files.dedup();
    let total: u64 = files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(fx.dir.join(f)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            st.tensors()
                .iter()
                .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
                .sum::<u64>()
        })
        .sum();
    assert_eq!(v["parameters"].as_u64().unwrap(), total);
    assert_eq!(v["special_tokens"]["image"]["token"], "<image>");
    let text = flamingo()
        .args(["inspect", "--model"])
        .arg(&fx.dir)
        .output()
        .unwrap();
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("perceiver resampler") && text.contains("BF16"),
        "{text}"
    );
}

/// Distinct requests for `flamingo batch`: (prompt, images, max_new_tokens, temperature, seed).
const BATCH_REQUESTS: [(&str, &[&str], usize, f32, u64); 4] = [
    (
        "User:<image>Describe this image.\nAssistant:",
        &["chelsea.png"],
        9,
        0.0,
        0,
    ),
    ("<image>What is in the cup?", &["coffee.png"], 5, 0.0, 0),
    (
        "<image>And this one?<image>Compare them.",
        &["rocket.jpg", "astronaut.png"],
        7,
        0.9,
        11,
    ),
    (
        "Question: How many animals are there? Answer:",
        &[],
        12,
        0.0,
        0,
    ),
];

/// What `flamingo generate --json` prints for each distinct batch request.
fn generate_alone(model: &std::path::Path) -> Vec<serde_json::Value> {
    let images = common::fixture_dir("images");
    BATCH_REQUESTS
        .iter()
        .map(|(prompt, files, max_new, temperature, seed)| {
            let mut cmd = flamingo();
            cmd.args(["generate", "--json", "--model"])
                .arg(model)
                .args([
                    "--prompt",
                    prompt,
                    "--max-new-tokens",
                    &max_new.to_string(),
                    "--temperature",
                    &temperature.to_string(),
                    "--seed",
                    &seed.to_string(),
                ]);
            for f in *files {
                cmd.arg("--image").arg(images.join(f));
            }
            json_of(&cmd.output().unwrap())
        })
        .collect()
}

/// Writes `n` request lines cycling through `BATCH_REQUESTS` (plus `extra` lines at the end) and runs
/// `flamingo batch` with `flags`; returns the result lines and the summary printed on stderr.
fn run_batch(
    model: &std::path::Path,
    n: usize,
    extra: &[&str],
    flags: &[&str],
) -> (Vec<serde_json::Value>, String) {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(common::fixture_dir("images")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let mut lines: Vec<String> = (0..n)
        .map(|i| {
            let (prompt, images, max_new, temperature, seed) =
                BATCH_REQUESTS[i % BATCH_REQUESTS.len()];
            serde_json::json!({"prompt": prompt, "images": images, "max_new_tokens": max_new,
                               "temperature": temperature, "seed": seed})
            .to_string()
        })
        .collect();
    lines.extend(extra.iter().map(|s| s.to_string()));
    let input = dir.path().join("requests.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let output = dir.path().join("results.jsonl");
    let out = flamingo()
        .args(["batch", "--model"])
        .arg(model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(flags)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(stderr.contains("requests/s"), "no summary: {stderr}");
    let results = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (results, stderr.to_string())
}

/// Limits small enough to preempt, after `--no-prefix-cache` (`TIGHT[1..]`: with the caches).
const TIGHT: [&str; 7] = ["--no-prefix-cache", "--kv-blocks", "12", "--block-size", "4", "--max-step-tokens", "40"];

#[test]
fn batch_of_64_gives_what_generate_gives_alone_also_when_preempting() {
    let fx = Fixture::load("tiny-idefics-a");
    let alone = generate_alone(&fx.dir);
    for flags in [
        &[][..],
        &TIGHT[1..],
        &TIGHT[..],
    ] {
        let (results, summary) = run_batch(&fx.dir, 64, &[], flags);
        let preempted = !summary.contains(" 0 preemptions");
        assert_eq!(preempted, !flags.is_empty(), "{flags:?}: {summary}");
        // 64 requests cycling through a few prompts: with the caches, images are reused, and prompt blocks too
        // once requests are admitted after others have run (at the default limits all start in the first step).
        let cache_off = flags.contains(&"--no-prefix-cache");
        assert_eq!(summary.contains("media cache 0 of"), cache_off, "{flags:?}: {summary}");
        let no_prefix_hits = summary.contains("prefix cache 0 of");
        assert!(no_prefix_hits == cache_off || flags.is_empty(), "{flags:?}: {summary}");
        assert_eq!(results.len(), 64, "{flags:?}: one result per request");
        for (i, r) in results.iter().enumerate() {
            let want = &alone[i % BATCH_REQUESTS.len()];
            assert_eq!(
                ids(&r["generated_ids"]),
                ids(&want["generated_ids"]),
                "{flags:?}: request {i}"
            );
            assert_eq!(r["text"], want["text"], "{flags:?}: request {i}");
            assert_eq!(
                r["finish_reason"], want["finish_reason"],
                "{flags:?}: request {i}"
            );
            assert_eq!(
                r["prompt_tokens"].as_u64().unwrap() as usize,
                ids(&want["prompt_ids"]).len()
            );
        }
    }
}

#[test]
fn batch_reports_bad_requests_in_place_and_runs_the_rest() {
    let fx = Fixture::load("tiny-idefics-a");
    let bad = [
        "not json",
        r#"{"prompt": "<image>", "images": ["missing.png"]}"#,
        r#"{"prompt": "<image><image>", "images": ["chelsea.png"]}"#,
        r#"{"prompt": "hi", "temperature": -1}"#,
        r#"{"prompt": "hi", "unknown_field": 1}"#,
    ];
    let (results, _) = run_batch(&fx.dir, 3, &bad, &[]);
    assert_eq!(results.len(), 3 + bad.len());
    for r in &results[..3] {
        assert!(r["generated_ids"].is_array(), "{r}");
    }
    let expect = [
        "bad request",
        "missing.png",
        "2 `<image>` marker(s) but 1 image(s)",
        "temperature",
        "unknown_field",
    ];
    for (i, (r, want)) in results[3..].iter().zip(expect).enumerate() {
        let msg = r["error"]
            .as_str()
            .unwrap_or_else(|| panic!("line {}: no error: {r}", i + 4));
        assert!(msg.starts_with(&format!("line {}:", i + 4)), "{msg}");
        assert!(msg.contains(want), "expected {want:?} in {msg:?}");
    }
}

#[test]
fn batch_answers_blank_and_non_utf8_lines_in_place_so_outputs_line_up() {
    let fx = Fixture::load("tiny-idefics-a");
    let dir = tempfile::tempdir().unwrap();
    let good = br#"{"prompt": "User: hi\nAssistant:", "max_new_tokens": 3}"#;
    let mut input = Vec::new();
    for line in [
        &good[..],
        b"",
        b"   ",
        b"{\"prompt\": \"\xff\xfe\"}",
        &good[..],
    ] {
        input.extend_from_slice(line);
        input.push(b'\n');
    }
    std::fs::write(dir.path().join("in.jsonl"), &input).unwrap();
    let output = dir.path().join("out.jsonl");
    let out = flamingo()
        .args(["batch", "--model"])
        .arg(&fx.dir)
        .arg("--input")
        .arg(dir.path().join("in.jsonl"))
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        results.len(),
        5,
        "one output line per input line: {results:?}"
    );
    assert!(results[0]["generated_ids"].is_array() && results[4]["generated_ids"].is_array());
    assert_eq!(results[0]["generated_ids"], results[4]["generated_ids"]);
    for (i, want) in [
        (1, "line 2: blank line"),
        (2, "line 3: blank line"),
        (3, "line 4: not UTF-8"),
    ] {
        let error = results[i]["error"].as_str().unwrap_or_default();
        assert!(error.contains(want), "line {}: {}", i + 1, results[i]);
    }
}

/// OpenAI's Batch API format, as vLLM's run_batch takes it: chat and completions bodies with the server's field
/// names, each answered with the server's response body under its `custom_id`, refused ones with their 4xx in
/// place; the file's own format takes the same names (`max_tokens`, `logprobs`, `n`).
#[test]
fn batch_takes_openai_batch_api_lines_and_answers_each_under_its_custom_id() {
    use base64::Engine as _;
    let fx = Fixture::load("tiny-idefics-a");
    let png = std::fs::read(common::fixture_dir("images").join("chelsea.png")).unwrap();
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png));
    let chat = serde_json::json!({"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                {"type": "text", "text": "Describe this image."}]}],
                 "max_tokens": 5, "logprobs": true, "top_logprobs": 2}});
    let completion = serde_json::json!({"custom_id": "cmpl-1", "method": "POST", "url": "/v1/completions",
        "body": {"prompt": "User: hi\nAssistant:", "max_tokens": 4, "n": 2, "seed": 3, "temperature": 1.0}});
    let refused = serde_json::json!({"custom_id": "bad-1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "x"}], "tools": []}});
    let wrong_url = serde_json::json!({"custom_id": "bad-2", "method": "POST", "url": "/v1/embeddings",
        "body": {"input": "x"}});
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("batch.jsonl");
    let lines = [chat.to_string(), completion.to_string(), String::new(), refused.to_string(), wrong_url.to_string()];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let output = dir.path().join("out.jsonl");
    let batch = || -> Vec<serde_json::Value> {
        let out = flamingo()
            .args(["batch", "--device", "cpu", "--model"])
            .arg(&fx.dir)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(&output)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let results = batch();
    assert_eq!(results.len(), lines.len(), "one output line per input line");
    let chat = &results[0];
    assert_eq!(chat["custom_id"], "chat-1");
    assert_eq!(chat["response"]["status_code"], 200);
    let body = &chat["response"]["body"];
    assert_eq!(body["object"], "chat.completion");
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, body["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let choices = results[1]["response"]["body"]["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "n = 2");
    assert_eq!(choices[1]["index"], 1);
    assert!(results[2]["error"].is_null() && results[2]["response"]["status_code"] == 400, "{}", results[2]);
    assert!(results[2]["response"]["body"]["error"]["message"].as_str().unwrap().contains("blank line"));
    assert_eq!(results[3]["custom_id"], "bad-1");
    assert_eq!(results[3]["response"]["status_code"], 400);
    assert_eq!(results[3]["response"]["body"]["error"]["param"], "tools");
    assert!(results[4]["response"]["body"]["error"]["message"].as_str().unwrap().contains("url"), "{}", results[4]);
    // The file's own format with the server's names.
    let own = serde_json::json!({"prompt": "User: hi\nAssistant:", "max_tokens": 3, "logprobs": 1, "n": 2});
    std::fs::write(&input, own.to_string()).unwrap();
    let r = batch().remove(0);
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["generated_ids"].as_array().unwrap().len(), 3);
    assert_eq!(choices[0]["logprobs"]["tokens"].as_array().unwrap().len(), 3);
}

/// The binary stands alone: copied out of the tree and run elsewhere with the embedded demo model and picture
/// (written once into the cache), `flamingo generate` answers as it does in the tree.
#[test]
fn an_installed_binary_runs_the_embedded_demo_model_from_any_directory() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("flamingo");
    std::fs::copy(env!("CARGO_BIN_EXE_flamingo"), &binary).unwrap();
    let cache = dir.path().join("cache");
    let run = |embedded: bool| {
        let mut cmd = Command::new(&binary);
        cmd.args(["generate", "--device", "cpu", "--json"]).current_dir(dir.path());
        if embedded {
            cmd.env("FLAMINGO_BUNDLED_FROM", "embedded").env("XDG_CACHE_HOME", &cache);
        }
        json_of(&cmd.output().unwrap())
    };
    let in_tree = run(false);
    let embedded = run(true);
    assert_eq!(embedded, in_tree);
    assert!(!embedded["generated_ids"].as_array().unwrap().is_empty());
    let extracted: Vec<String> = std::fs::read_dir(cache.join("flamingo"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(extracted.iter().any(|n| n.starts_with("demo-model-")), "{extracted:?}");
    assert!(extracted.iter().any(|n| n.starts_with("example-")), "{extracted:?}");
    assert_eq!(run(true), in_tree, "a second run uses the extracted copy");
}

/// `flamingo generate | head -c 0`: the reader is gone before the first token (closed right after the spawn, long
/// before the model has loaded) and the command ends as Unix tools do (SIGPIPE), with no panic.
#[test]
fn a_closed_stdout_ends_the_command_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = flamingo()
        .args(["generate", "--device", "cpu", "--max-new-tokens", "64"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {stderr}", out.status);
}
