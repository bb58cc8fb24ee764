//! `flamingo score` as a user runs it: on the bundled demo model's 64 held-out pictures the right answer ranks
//! first against 4 wrong ones for at least 90% of them; a candidate's score is the summed log-probability the
//! engine reports for the same text echoed (prompt log-probabilities), forked or not; bad lines are answered in
//! place.

use std::path::{Path, PathBuf};
use std::process::Command;

use flamingo::backend::cpu::CpuBackend;
use flamingo::runtime::pipeline::Pipeline;
use flamingo::runtime::request::GenerationRequest;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn heldout() -> PathBuf {
    root().join("tests/fixtures/demo-heldout")
}

/// Runs `flamingo score` on `lines` (written into `dir`) and returns its output lines.
fn score(dir: &Path, lines: &[String], extra: &[&str]) -> Vec<Value> {
    let input = dir.join("in.jsonl");
    let output = dir.join("out.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["score", "--device", "cpu", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Each held-out picture's prompt with its right answer first and 4 other answers of the set (of the same kind
/// of question where there are enough).
fn heldout_lines() -> Vec<String> {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(heldout().join("expected.json")).unwrap()).unwrap();
    let items = expected["items"].as_array().unwrap();
    let answer = |i: &Value| i["answer"].as_str().unwrap().to_string();
    let mut all: Vec<String> = items.iter().map(answer).collect();
    all.sort();
    all.dedup();
    items
        .iter()
        .enumerate()
        .map(|(n, item)| {
            let right = answer(item);
            let mut same: Vec<String> = items
                .iter()
                .filter(|j| j["kind"] == item["kind"])
                .map(answer)
                .filter(|a| *a != right)
                .collect();
            same.sort();
            same.dedup();
            let others: Vec<String> =
                all.iter().filter(|a| **a != right && !same.contains(a)).cloned().collect();
            let mut wrong: Vec<String> = same.into_iter().chain(others).collect();
            let turn = n % wrong.len();
            wrong.rotate_left(turn);
            let candidates: Vec<String> =
                std::iter::once(right).chain(wrong.into_iter().take(4)).map(|a| format!(" {a}")).collect();
            json!({
                "images": [heldout().join(item["image"].as_str().unwrap())],
                "prompt": item["prompt"],
                "candidates": candidates,
            })
            .to_string()
        })
        .collect()
}

#[test]
fn the_right_answer_ranks_first_for_nine_in_ten_heldout_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let lines = heldout_lines();
    let results = score(dir.path(), &lines, &[]);
    assert_eq!(results.len(), 64);
    let right = results.iter().filter(|r| r["ranking"][0] == 0).count();
    eprintln!("right answer first: {right} of 64");
    assert!(right * 10 >= 64 * 9, "only {right} of 64");
    for r in &results {
        let scores = r["scores"].as_array().unwrap();
        assert_eq!(scores.len(), 5);
        let ranking: Vec<usize> = r["ranking"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let lp = |k: usize| scores[k]["logprob"].as_f64().unwrap();
        assert!(ranking.windows(2).all(|w| lp(w[0]) >= lp(w[1])), "{r}");
        for s in scores {
            let mean = s["logprob"].as_f64().unwrap() / s["tokens"].as_f64().unwrap();
            assert!((s["mean_logprob"].as_f64().unwrap() - mean).abs() < 1e-12);
        }
    }
    // Blocks of 4 share most of each prompt between its candidates (block size 16 shares none of these
    // 14-token prompts): the scores do not change.
    let small_blocks = score(dir.path(), &lines, &["--block-size", "4"]);
    assert_eq!(small_blocks, results);
}

#[test]
fn a_score_is_the_summed_log_probability_of_the_candidate_echoed() {
    let p = Pipeline::load(&root().join("assets/demo-model"), CpuBackend::new(), false).unwrap();
    let prompt = "User:<image>Describe this image.<end_of_utterance>\nAssistant:";
    let image = heldout().join("005.png");
    let candidates = [" a green star and a green triangle.", " a red circle.", " two."];
    let line = json!({"images": [image], "prompt": prompt, "candidates": candidates}).to_string();
    let dir = tempfile::tempdir().unwrap();
    let result = &score(dir.path(), &[line], &["--block-size", "4"])[0];
    let (prefix, _) = p.prepare(prompt, &[image.clone()]).unwrap();
    for (k, candidate) in candidates.iter().enumerate() {
        let (full, pixels) = p.prepare(&format!("{prompt}{candidate}"), &[image.clone()]).unwrap();
        let request = GenerationRequest { max_new_tokens: 0, prompt_logprobs: Some(0), ..Default::default() };
        let out = p.generate(&full, pixels, &request, |_| {}).unwrap();
        let tail = &out.prompt_logprobs[prefix.ids.len() - 1..];
        let sum: f64 = tail.iter().map(|l| l.logprob as f64).sum();
        let s = &result["scores"][k];
        assert_eq!(s["candidate"], *candidate);
        assert_eq!(s["tokens"], tail.len());
        // serde_json's float parsing may be an ulp off the printed value.
        let got = s["logprob"].as_f64().unwrap();
        assert!((got - sum).abs() <= 1e-12 * sum.abs(), "candidate {k}: forked {got}, alone {sum}");
    }
}

#[test]
fn bad_lines_are_answered_in_place_and_the_others_scored() {
    let dir = tempfile::tempdir().unwrap();
    let image = heldout().join("000.png");
    let good = json!({"images": [image], "prompt": "User:<image>What shape is yellow?", "candidates": [" a circle."]});
    let lines = [
        good.to_string(),
        String::new(),
        json!({"images": [image], "prompt": "x"}).to_string(),
        json!({"images": [image], "prompt": "<image>x", "candidates": []}).to_string(),
        json!({"images": ["missing.png"], "prompt": "<image>x", "candidates": [" y"]}).to_string(),
        json!({"images": [image], "prompt": "<image>x", "candidates": [" y", ""]}).to_string(),
        json!({"images": [], "prompt": "<image>x", "candidates": [" y"]}).to_string(),
        json!({"prompt": "x", "candidates": [" y"], "temperature": 1}).to_string(),
        good.to_string(),
    ];
    let results = score(dir.path(), &lines, &[]);
    assert_eq!(results.len(), lines.len());
    let error = |i: usize| results[i]["error"].as_str().unwrap_or_else(|| panic!("line {i}: {}", results[i])).to_string();
    assert!(error(1).contains("line 2: blank line"), "{}", error(1));
    assert!(error(2).contains("candidates"), "{}", error(2));
    assert!(error(3).contains("candidates: the list is empty"), "{}", error(3));
    assert!(error(4).contains("missing.png"), "{}", error(4));
    assert!(error(5).contains("candidates[1]"), "{}", error(5));
    assert!(error(6).contains("image"), "{}", error(6));
    assert!(error(7).contains("temperature"), "{}", error(7));
    assert_eq!(results[0], results[8]);
    assert!(results[0]["scores"][0]["logprob"].as_f64().unwrap() < 0.0);
}
