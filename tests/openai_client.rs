//! `flamingo serve` driven by the official `openai` Python package, as users' programs drive it: log-probabilities
//! in chat and completions (streamed and not), echo, `n` seeded choices, refused fields (one test per field), the
//! API key, CORS preflight, `models.retrieve`, fresh randomness without a seed. The package is installed into the
//! git-ignored `.toolchain/openai-venv` by `scripts/install-openai-client.sh`; where it cannot be installed these
//! tests say so and pass, except under `CI_REQUIRE_OPENAI=1` (CI), where that is a failure.
//!
//! One server (the bundled demo model, `--api-key`, one allowed CORS origin) serves every test. Each test runs a
//! short Python program that prints one `RESULT <json>` line; the assertions are here.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use base64::Engine as _;
use flamingo::backend::cpu::CpuBackend;
use flamingo::model::sampling::SamplingParams;
use flamingo::runtime::pipeline::Pipeline;
use flamingo::runtime::request::GenerationRequest;
use serde_json::Value;

const KEY: &str = "sk-test-flamingo";
const ORIGIN: &str = "https://app.example";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's python, or `None` (with the reason printed) where the package cannot be installed.
fn python() -> Option<&'static PathBuf> {
    static PYTHON: OnceLock<Option<PathBuf>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let out = Command::new("bash")
                .arg(root().join("scripts/install-openai-client.sh"))
                .output()
                .expect("bash runs");
            if out.status.success() {
                return Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()));
            }
            let why = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(
                std::env::var_os("CI_REQUIRE_OPENAI").is_none(),
                "CI_REQUIRE_OPENAI is set but the openai package could not be installed:\n{why}"
            );
            eprintln!("skipped: the openai Python package could not be installed:\n{why}");
            None
        })
        .as_ref()
}

struct Server {
    /// Held until the test process exits; the wrapper kills the server when it reads end of file.
    _stdin: std::process::ChildStdin,
    _child: Child,
    base: String,
}

/// The shared server, started on first use. A static is never dropped, so the server runs under a shell that
/// kills it when the test process's end of its stdin closes (at exit, however the process ends).
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut child = Command::new("bash")
            .args(["-c", "\"$@\" & pid=$!; read -r _; kill $pid; wait $pid", "serve"])
            .arg(env!("CARGO_BIN_EXE_flamingo"))
            .args(["serve", "--device", "cpu", "--port", "0", "--api-key", KEY])
            .args(["--cors-allow-origin", ORIGIN, "--max-tokens", "64"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("server exited before listening").unwrap();
            if let Some(addr) = line.strip_prefix("flamingo: listening on ") {
                break addr.to_string();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Server { _stdin: child.stdin.take().unwrap(), _child: child, base }
    })
}

fn picture() -> PathBuf {
    root().join("tests/fixtures/demo-heldout/005.png")
}

/// Runs `body` after a prelude that makes `client` (the openai package's client on the server, with the key),
/// `IMAGE` (a data URL of a demo picture) and `out(value)`; returns what `out` printed, or `None` when the package
/// is not there.
fn run_python(body: &str) -> Option<Value> {
    let python = python()?;
    let png = std::fs::read(picture()).unwrap();
    let image = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    let program = format!(
        "import json, os, sys, http.client, urllib.parse\n\
         import openai\n\
         client = openai.OpenAI(base_url=os.environ['BASE'] + '/v1', api_key=os.environ['KEY'], max_retries=0)\n\
         IMAGE = os.environ['IMAGE']\n\
         def out(v):\n    print('RESULT ' + json.dumps(v))\n\
         def user(text):\n    return [{{'role': 'user', 'content': [\n        {{'type': 'image_url', 'image_url': {{'url': IMAGE}}}},\n        {{'type': 'text', 'text': text}}]}}]\n\
         {body}\n"
    );
    let out = Command::new(python)
        .arg("-c")
        .arg(&program)
        .env("BASE", &server().base)
        .env("KEY", KEY)
        .env("IMAGE", image)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in:\n{stdout}"));
    Some(serde_json::from_str(line).unwrap())
}

/// What the library gives for the chat prompt the server renders for `user(text)` (IDEFICS' chat format).
fn library_logprobs(text: &str, max_new_tokens: usize, top: usize) -> Vec<(f32, Vec<f32>)> {
    let p = Pipeline::load(&root().join("assets/demo-model"), CpuBackend::new(), false).unwrap();
    let prompt = format!("User:<image>{text}<end_of_utterance>\nAssistant:");
    let (encoded, pixels) = p.prepare(&prompt, &[picture()]).unwrap();
    let request = GenerationRequest {
        max_new_tokens,
        sampling: SamplingParams { logprobs: Some(top), ..Default::default() },
        ..Default::default()
    };
    let out = p.generate(&encoded, pixels, &request, |_| {}).unwrap();
    out.logprobs.iter().map(|l| (l.logprob, l.top.iter().map(|t| t.1).collect())).collect()
}

#[test]
fn chat_logprobs_and_top_logprobs_are_the_engines() {
    let Some(r) = run_python(
        "r = client.chat.completions.create(model='demo-model', messages=user('Describe this image.'),\n\
         max_tokens=12, logprobs=True, top_logprobs=3)\n\
         c = r.choices[0]\n\
         out({'text': c.message.content, 'usage': r.usage.completion_tokens,\n\
              'content': [{'token': t.token, 'logprob': t.logprob, 'bytes': t.bytes,\n\
                           'top': [x.logprob for x in t.top_logprobs]} for t in c.logprobs.content]})",
    ) else {
        return;
    };
    let content = r["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, r["usage"].as_u64().unwrap());
    let want = library_logprobs("Describe this image.", 12, 3);
    assert_eq!(content.len(), want.len());
    for (got, (lp, top)) in content.iter().zip(&want) {
        assert!((got["logprob"].as_f64().unwrap() - *lp as f64).abs() < 1e-6, "{got}");
        let got_top: Vec<f64> = got["top"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got_top.len(), 3);
        for (g, w) in got_top.iter().zip(top) {
            assert!((g - *w as f64).abs() < 1e-6);
        }
        // Greedy: the chosen token is the most likely one.
        assert_eq!(got_top[0], got["logprob"].as_f64().unwrap());
        let token = got["token"].as_str().unwrap();
        let bytes: Vec<u8> = got["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(bytes, token.as_bytes());
    }
    let pieces: String = content.iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert!(pieces.contains(r["text"].as_str().unwrap().trim()), "{pieces:?} vs {}", r["text"]);
}

#[test]
fn streamed_chat_logprobs_equal_the_whole_response() {
    let Some(r) = run_python(
        "kw = dict(model='demo-model', messages=user('Describe this image.'), max_tokens=12, logprobs=True,\n\
         top_logprobs=2, seed=3, temperature=1.0)\n\
         whole = client.chat.completions.create(**kw).choices[0]\n\
         text, tokens = '', []\n\
         for chunk in client.chat.completions.create(stream=True, **kw):\n\
         \x20   c = chunk.choices[0]\n\
         \x20   text += c.delta.content or ''\n\
         \x20   if c.logprobs is not None:\n\
         \x20       tokens += [(t.token, t.logprob) for t in c.logprobs.content]\n\
         out({'whole': [whole.message.content, [(t.token, t.logprob) for t in whole.logprobs.content]],\n\
              'stream': [text, tokens]})",
    ) else {
        return;
    };
    assert_eq!(r["whole"], r["stream"]);
    assert!(!r["stream"][1].as_array().unwrap().is_empty());
}

#[test]
fn completions_echo_scores_the_prompt_as_flamingo_score_does() {
    let prompt = "User:<image>Describe this image.<end_of_utterance>\nAssistant:";
    let candidate = " a green star and a green triangle.";
    let Some(r) = run_python(&format!(
        "p = {prompt:?}\n\
         scored = client.completions.create(model='demo-model', prompt=p + {candidate:?}, max_tokens=0, echo=True,\n\
         logprobs=2, extra_body={{'images': [IMAGE]}})\n\
         prefix = client.completions.create(model='demo-model', prompt=p, max_tokens=0, echo=True, logprobs=0,\n\
         extra_body={{'images': [IMAGE]}})\n\
         gen = client.completions.create(model='demo-model', prompt=p, max_tokens=4, echo=True, logprobs=1,\n\
         extra_body={{'images': [IMAGE]}})\n\
         lp = lambda c: c.choices[0].logprobs\n\
         out({{'text': scored.choices[0].text, 'tokens': lp(scored).tokens, 'lps': lp(scored).token_logprobs,\n\
              'tops': lp(scored).top_logprobs, 'offsets': lp(scored).text_offset,\n\
              'prefix_tokens': len(lp(prefix).tokens), 'usage': scored.usage.completion_tokens,\n\
              'gen_text': gen.choices[0].text, 'gen_tokens': len(lp(gen).tokens),\n\
              'gen_usage': [gen.usage.prompt_tokens, gen.usage.completion_tokens]}})"
    )) else {
        return;
    };
    assert_eq!(r["text"], format!("{prompt}{candidate}"));
    assert_eq!(r["usage"], 0, "max_tokens 0 generates nothing");
    let lps = r["lps"].as_array().unwrap();
    assert!(lps[0].is_null() && r["tops"][0].is_null(), "the first token has no log-probability");
    assert!(lps[1..].iter().all(|l| l.as_f64().unwrap() <= 0.0));
    assert!(r["tops"][1].as_object().unwrap().len() <= 2);
    let offsets: Vec<u64> = r["offsets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    // The candidate's tokens are those past the prompt's: their sum is `flamingo score`'s logprob.
    let n = r["prefix_tokens"].as_u64().unwrap() as usize;
    let echo_sum: f64 = lps[n..].iter().map(|l| l.as_f64().unwrap()).sum();
    let dir = tempfile::tempdir().unwrap();
    let line = serde_json::json!({"images": [picture()], "prompt": prompt, "candidates": [candidate]});
    std::fs::write(dir.path().join("in.jsonl"), format!("{line}\n")).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["score", "--device", "cpu", "--input"])
        .arg(dir.path().join("in.jsonl"))
        .arg("--output")
        .arg(dir.path().join("out.jsonl"))
        .output()
        .unwrap();
    assert!(status.status.success());
    let scored: Value =
        serde_json::from_str(std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap().trim()).unwrap();
    let score = scored["scores"][0]["logprob"].as_f64().unwrap();
    assert!((echo_sum - score).abs() < 1e-4, "echo {echo_sum} vs score {score}");
    assert_eq!(scored["scores"][0]["tokens"].as_u64().unwrap() as usize, lps.len() - n);
    // Echo with generation: the prompt, then the new text; logprobs of both.
    assert!(r["gen_text"].as_str().unwrap().starts_with(prompt));
    let (p, c) = (r["gen_usage"][0].as_u64().unwrap(), r["gen_usage"][1].as_u64().unwrap());
    assert_eq!(r["gen_tokens"].as_u64().unwrap(), p + c);
}

#[test]
fn three_seeded_choices_differ_and_repeat() {
    let Some(r) = run_python(
        "kw = dict(model='demo-model', messages=[{'role': 'user', 'content': 'Hello'}], max_tokens=16, n=3, seed=7,\n\
         temperature=1.0)\n\
         a = client.chat.completions.create(**kw)\n\
         b = client.chat.completions.create(**kw)\n\
         out({'a': [c.message.content for c in a.choices], 'b': [c.message.content for c in b.choices],\n\
              'index': [c.index for c in a.choices], 'ids': [a.id, b.id]})",
    ) else {
        return;
    };
    assert_eq!(r["a"], r["b"], "seeded choices repeat");
    assert_eq!(r["index"], serde_json::json!([0, 1, 2]));
    let a: std::collections::HashSet<&str> = r["a"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(a.len() >= 2, "choices should differ: {}", r["a"]);
    assert_ne!(r["ids"][0], r["ids"][1], "response ids are unique");
}

#[test]
fn without_a_seed_sampling_draws_fresh_randomness() {
    let Some(r) = run_python(
        "texts = [client.chat.completions.create(model='demo-model', messages=[{'role': 'user', 'content': 'Hello'}],\n\
         max_tokens=16, temperature=1.0).choices[0].message.content for _ in range(8)]\n\
         out(texts)",
    ) else {
        return;
    };
    let distinct: std::collections::HashSet<&str> =
        r.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(distinct.len() >= 2, "8 unseeded samples at temperature 1 were all {distinct:?}");
}

/// A request with `field` set is refused with a 400 naming it, in OpenAI's error shape.
fn refused(call: &str, field: &str) {
    let Some(r) = run_python(&format!(
        "try:\n    {call}\n    out({{'status': 200}})\n\
         except openai.BadRequestError as e:\n    out({{'status': e.status_code, 'body': e.body}})"
    )) else {
        return;
    };
    assert_eq!(r["status"], 400, "{field}: {r}");
    assert_eq!(r["body"]["param"], field);
    assert!(r["body"]["message"].as_str().unwrap().starts_with(field), "{r}");
    assert_eq!(r["body"]["type"], "invalid_request_error");
}

#[test]
fn response_format_is_refused() {
    refused(
        "client.chat.completions.create(model='demo-model', messages=user('x'), response_format={'type': 'json_object'})",
        "response_format",
    );
}

#[test]
fn tools_are_refused() {
    refused(
        "client.chat.completions.create(model='demo-model', messages=user('x'), tools=[{'type': 'function', \
         'function': {'name': 'f', 'parameters': {'type': 'object', 'properties': {}}}}])",
        "tools",
    );
}

#[test]
fn best_of_is_refused() {
    refused("client.completions.create(model='demo-model', prompt='x', best_of=2)", "best_of");
}

#[test]
fn suffix_is_refused() {
    refused("client.completions.create(model='demo-model', prompt='x', suffix='y')", "suffix");
}

#[test]
fn an_unknown_field_is_refused() {
    refused(
        "client.chat.completions.create(model='demo-model', messages=user('x'), extra_body={'mirostat': 2})",
        "mirostat",
    );
}

#[test]
fn a_wrong_or_missing_api_key_is_a_401() {
    let Some(r) = run_python(
        "bad = openai.OpenAI(base_url=os.environ['BASE'] + '/v1', api_key='sk-wrong', max_retries=0)\n\
         try:\n    bad.models.list()\n    out({'status': 200})\n\
         except openai.AuthenticationError as e:\n    out({'status': e.status_code, 'body': e.body})",
    ) else {
        return;
    };
    assert_eq!(r["status"], 401);
    assert_eq!(r["body"]["code"], "invalid_api_key");
}

#[test]
fn cors_preflight_allows_the_configured_origin_only() {
    let Some(r) = run_python(&format!(
        "u = urllib.parse.urlparse(os.environ['BASE'])\n\
         def preflight(origin):\n\
         \x20   c = http.client.HTTPConnection(u.hostname, u.port)\n\
         \x20   c.request('OPTIONS', '/v1/chat/completions', headers={{'Origin': origin,\n\
         \x20       'Access-Control-Request-Method': 'POST',\n\
         \x20       'Access-Control-Request-Headers': 'authorization,content-type'}})\n\
         \x20   r = c.getresponse()\n\
         \x20   return [r.status, r.getheader('access-control-allow-origin'), r.getheader('access-control-allow-methods')]\n\
         out({{'ok': preflight({ORIGIN:?}), 'other': preflight('https://evil.example')}})"
    )) else {
        return;
    };
    let ok = &r["ok"];
    assert!(ok[0] == 200 || ok[0] == 204, "{r}");
    assert_eq!(ok[1], ORIGIN);
    assert!(ok[2].as_str().unwrap().contains("POST"));
    assert!(r["other"][1].is_null(), "an origin not allowed gets no allow-origin: {r}");
}

#[test]
fn models_retrieve_finds_the_served_model_and_404s_others() {
    let Some(r) = run_python(
        "m = client.models.retrieve('demo-model')\n\
         try:\n    client.models.retrieve('gpt-4o')\n    missing = None\n\
         except openai.NotFoundError as e:\n    missing = [e.status_code, e.body]\n\
         try:\n    client.chat.completions.create(model='gpt-4o', messages=user('x'))\n    chat = None\n\
         except openai.NotFoundError as e:\n    chat = e.status_code\n\
         out({'id': m.id, 'object': m.object, 'missing': missing, 'chat': chat})",
    ) else {
        return;
    };
    assert_eq!(r["id"], "demo-model");
    assert_eq!(r["object"], "model");
    assert_eq!(r["missing"][0], 404);
    assert_eq!(r["missing"][1]["code"], "model_not_found");
    assert_eq!(r["chat"], 404, "an unknown model is not served");
}
