//! Synthetic models, `flamingo bench` and `flamingo profile` as a user runs them (CPU, tiny shapes, reduced
//! workloads). Speed itself is never asserted: only that every figure is there and is a positive, finite number.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{fixture_dir, json_of, FIXTURES};
use flamingo::backend::cpu::CpuBackend;
use flamingo::backend::Backend;
use flamingo::cli::options::bundled_model_dir;
use flamingo::io::config::IdeficsConfig;
use flamingo::io::prompt::encode_prompt;
use flamingo::io::safetensors::WeightStore;
use flamingo::io::mllama_config::MllamaConfig;
use flamingo::model::idefics::synthetic::{tensor_specs, Preset};
use flamingo::model::mllama::synthetic as mllama_synthetic;
use flamingo::runtime::pipeline::{ModelFiles, Pipeline};

fn flamingo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(args)
        .output()
        .unwrap()
}

/// Every tensor transformers saves for a configuration, as the synthetic model lists them: checked against the
/// three fixture checkpoints (resampler or not, scalar or vector gates, qk norms or not).
#[test]
fn synthetic_tensors_match_real_checkpoints() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let cfg = IdeficsConfig::from_file(&dir.join("config.json")).unwrap();
        let specs: BTreeSet<(String, Vec<usize>)> = tensor_specs(&cfg).into_iter().collect();
        let stored: BTreeSet<(String, Vec<usize>)> = WeightStore::open_dir(&dir)
            .unwrap()
            .summary()
            .into_iter()
            .map(|(n, shape, _)| (n, shape))
            .collect();
        assert_eq!(specs, stored, "{name}");
    }
}

/// Synthetic Llama 3.2 11B Vision lists exactly the real checkpoint's 906 tensors (tests/data/mllama-11b-shapes.json,
/// read from the hub model), and the tiny fixtures' tensors for their configs.
#[test]
fn synthetic_mllama_tensors_match_real_checkpoints() {
    let shapes: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture_dir("../data/mllama-11b-shapes.json")).unwrap(),
    )
    .unwrap();
    let real: BTreeSet<(String, Vec<usize>)> = shapes["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(n, s)| (n.clone(), s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
        .collect();
    let cfg = mllama_synthetic::config_11b().unwrap();
    let specs: BTreeSet<(String, Vec<usize>)> = mllama_synthetic::tensor_specs(&cfg).into_iter().collect();
    assert_eq!(specs, real);
    let store = mllama_synthetic::store_11b().unwrap();
    assert_eq!(store.params(), 10_670_220_835);
    for name in ["tiny-mllama-a", "tiny-mllama-b", "tiny-mllama-c"] {
        let dir = fixture_dir(name);
        let cfg = MllamaConfig::from_file(&dir.join("config.json")).unwrap();
        let specs: BTreeSet<(String, Vec<usize>)> = mllama_synthetic::tensor_specs(&cfg).into_iter().collect();
        let stored: BTreeSet<(String, Vec<usize>)> =
            WeightStore::open_dir(&dir).unwrap().summary().into_iter().map(|(n, shape, _)| (n, shape)).collect();
        assert_eq!(specs, stored, "{name}");
    }
}

#[test]
fn synthetic_sizes_are_the_published_ones() {
    let params = |p: Preset| {
        let store = p.store().unwrap();
        (store.params(), store.bytes())
    };
    // tests/real_scale.rs counts the same from every idefics-9b tensor name and shape.
    assert_eq!(
        params(Preset::Idefics9b),
        (8_929_679_632, 2 * 8_929_679_632)
    );
    let (p80, bytes80) = params(Preset::Idefics80b);
    assert!((79.0e9..81.0e9).contains(&(p80 as f64)), "{p80}");
    assert!(bytes80 > 141_000_000_000, "{bytes80} bytes fit one H200?");
    let (mid, _) = params(Preset::CpuMid);
    assert!((285e6..300e6).contains(&(mid as f64)), "{mid}");
}

/// Weights are reproducible, never all zero, and keep activations O(1) through the model.
#[test]
fn synthetic_tiny_runs_with_bounded_activations() {
    let tokenizer = bundled_model_dir().unwrap().join("tokenizer.json");
    let files = ModelFiles::synthetic(Preset::Tiny, &tokenizer).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let a = files.store.get_any_shape(name).unwrap();
    let b = Preset::Tiny.store().unwrap().get_any_shape(name).unwrap();
    assert_eq!(a.bytes(), b.bytes(), "same seed, same weights");
    assert!(a.bytes().iter().any(|&x| x != 0));

    let p = Pipeline::from_files(files, CpuBackend::new(), false).unwrap();
    let prompt = encode_prompt(&p.tokenizer, "<image>A picture of", 1).unwrap();
    let s = p.idefics().unwrap().config.vision_config.image_size;
    let pixels: Vec<f32> = (0..3 * s * s)
        .map(|i| (i % 13) as f32 * 0.3 - 1.8)
        .collect();
    let mut hidden = Vec::new();
    let states = p.encode_images(&[flamingo::io::image::PreparedImage::whole(pixels)]);
    p.prefill_states(&prompt, &states, Some(&mut hidden))
        .unwrap();
    for (layer, h) in hidden.iter().enumerate() {
        let max = p
            .backend
            .to_host(h)
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            max.is_finite() && max < 100.0,
            "layer {layer}: max |h| = {max}"
        );
    }
    let last = p.backend.to_host(hidden.last().unwrap());
    assert!(
        last.iter().any(|&v| v != last[0]),
        "hidden states are constant"
    );
}

#[test]
fn idefics_80b_is_refused_with_the_reason() {
    let out = flamingo(&["bench", "--synthetic", "idefics-80b", "--device", "cpu"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("idefics-80b") && err.contains("does not fit on one H200"),
        "{err}"
    );
}

#[test]
fn unknown_synthetic_model_is_named() {
    let out = flamingo(&["bench", "--synthetic", "idefics-7b"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("idefics-7b") && err.contains("idefics-9b"),
        "{err}"
    );
}

/// Every number in `v` (recursively) is positive and finite.
fn assert_positive_numbers(path: &str, v: &serde_json::Value) {
    match v {
        serde_json::Value::Number(n) => {
            let x = n.as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{path} = {x}");
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                assert_positive_numbers(&format!("{path}[{i}]"), x);
            }
        }
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                assert_positive_numbers(&format!("{path}.{k}"), x);
            }
        }
        _ => {}
    }
}

#[test]
fn bench_json_has_every_figure() {
    bench_json_of(&["--synthetic", "tiny"]);
}

/// Llama 3.2 Vision benchmarks through the same figures, with its own floors (4-tile images, GQA K/V).
#[test]
fn bench_json_of_a_llama_3_2_vision_model() {
    let dir = common::fixture_dir("tiny-mllama-b");
    let v = bench_json_of(&["--model", dir.to_str().unwrap()]);
    // 4 tiles of 8 padded tokens through 6 layers of width 32 and the 16-wide decoder: far from zero work.
    assert!(v["params"].as_f64().unwrap() > 5e5, "{v}");
}

/// OpenFlamingo benchmarks through the same figures, with its own floors (open_clip's ViT, the resampler, the gated
/// blocks' K/V once per image), few-shot prompts in its format (`<image>caption<|endofchunk|>`).
#[test]
fn bench_json_of_an_openflamingo_model() {
    let dir = common::fixture_dir("tiny-openflamingo-b");
    // Within the fixture's 128 positions (its tokenizer splits the captions finely).
    let v = bench_json_of(&["--model", dir.to_str().unwrap(), "--prompt-tokens", "16", "--shots", "1,2"]);
    // GPT-NeoX 4 x 48 with its own head, 2 gated blocks with 512-wide attention, the 6-layer resampler.
    assert!(v["params"].as_f64().unwrap() > 4e5, "{v}");
}

/// `flamingo bench --json` on `model` (small settings): every figure there, positive and finite.
fn bench_json_of(model: &[&str]) -> serde_json::Value {
    let mut args = vec!["bench"];
    args.extend_from_slice(model);
    args.extend_from_slice(&[
        "--device",
        "cpu",
        "--json",
        "--concurrency",
        "2,3",
        "--new-tokens",
        "3",
        "--decode-tokens",
        "2",
        "--vision-images",
        "1",
        "--repeats",
        "1",
    ]);
    let out = flamingo(&args);
    let v = json_of(&out);
    let figure = |f: &serde_json::Value| {
        for field in ["value", "floor", "fraction"] {
            assert!(f[field].is_number(), "{field} missing in {f}");
        }
    };
    for key in [
        "time_to_first_token",
        "decode_batch1",
        "image_encode",
        "vision_images_per_s",
    ] {
        figure(&v[key]);
    }
    for key in ["params", "weight_gb", "decode_weight_gb", "prompt_tokens"] {
        assert!(v[key].is_number(), "{key} missing");
    }
    for key in ["copy_gb_per_s", "matmul_gflop_per_s"] {
        assert!(v["ceilings"][key].is_number(), "ceilings.{key} missing");
    }
    assert_eq!(
        v["decode_graphs"], false,
        "the CPU backend records no decode steps"
    );
    let runs = v["throughput"].as_array().unwrap();
    assert_eq!(
        runs.iter()
            .map(|r| r["concurrency"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [2, 3]
    );
    for r in runs {
        figure(&r["output_tokens_per_s"]);
        assert!(r["seconds"].is_number());
    }
    let mut rest = v.clone();
    for run in rest["few_shot"].as_array_mut().expect("few-shot runs") {
        assert_cache_figures_only_with_the_caches(run);
    }
    assert_positive_numbers("bench", &rest);
    v
}

/// A k-shot run's cache figures: zero without the caches (then taken out of `run`), positive with them.
fn assert_cache_figures_only_with_the_caches(run: &mut serde_json::Value) {
    let uncached = run["uncached"].as_object_mut().expect("an uncached run");
    for key in ["prefix_hit_rate", "media_hit_rate", "prefill_rows_saved"] {
        let x = uncached.remove(key).and_then(|x| x.as_f64());
        assert_eq!(x, Some(0.0), "uncached {key} in {run}");
    }
    let cached = &run["cached"];
    assert!(cached["images_encoded"].as_f64() < run["uncached"]["images_encoded"].as_f64(), "{run}");
}

/// `flamingo profile` on the tiny synthetic model on the CPU, with `args`.
fn profile_tiny(args: &[&str]) -> std::process::Output {
    let base = ["profile", "--synthetic", "tiny", "--device", "cpu"];
    flamingo(&[&base[..], args].concat())
}

#[test]
fn profile_prints_op_tables_and_writes_a_trace() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.json");
    let out = profile_tiny(&[
        "--decode-steps",
        "2",
        "--batch",
        "2",
        "--json",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    let v = json_of(&out);
    for phase in ["prefill", "decode"] {
        let ops = v["phases"][phase]["ops"].as_array().unwrap();
        assert!(!ops.is_empty(), "no ops in {phase}");
        let linear = ops
            .iter()
            .find(|o| o["op"].as_str().unwrap().starts_with("linear "))
            .unwrap_or_else(|| panic!("no linear op in {phase}"));
        for key in [
            "calls",
            "total_us",
            "flops",
            "bytes",
            "gb_per_s",
            "gflop_per_s",
        ] {
            let x = linear[key].as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{phase} {key} = {x}");
        }
    }
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trace).unwrap()).expect("the trace is JSON");
    let events = trace["traceEvents"].as_array().unwrap();
    let complete: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert!(complete
        .iter()
        .any(|e| e["name"] == "decode" && e["cat"] == "phase"));
    assert!(complete
        .iter()
        .any(|e| e["cat"] == "decode" && e["dur"].is_number()));
    // One span per engine step (the device is synchronised and op times read at its ends), and every op inside
    // a span of its phase, its time within the span's.
    let spans = |name: &str| -> Vec<(f64, f64)> {
        complete
            .iter()
            .filter(|e| e["cat"] == "phase" && e["name"] == name)
            .map(|e| {
                let ts = e["ts"].as_f64().unwrap();
                (ts, ts + e["dur"].as_f64().unwrap())
            })
            .collect()
    };
    assert_eq!(spans("prefill").len(), 1);
    assert_eq!(spans("decode").len(), 2, "one decode span per step");
    for phase in ["prefill", "decode"] {
        let within = spans(phase);
        for op in complete.iter().filter(|e| e["cat"] == phase) {
            let (ts, dur) = (op["ts"].as_f64().unwrap(), op["dur"].as_f64().unwrap());
            assert!(
                dur >= 0.0 && within.iter().any(|&(a, b)| a <= ts && ts + dur <= b),
                "{phase} op {op} outside its phase's spans {within:?}"
            );
        }
        let in_ops: f64 = v["phases"][phase]["ops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["total_us"].as_f64().unwrap())
            .sum();
        let wall = v["phases"][phase]["wall_us"].as_f64().unwrap();
        assert!(
            in_ops <= wall,
            "{phase}: ops {in_ops} us in {wall} us of wall time"
        );
    }

    let table = profile_tiny(&["--decode-steps", "1"]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("prefill:") && text.contains("decode:") && text.contains("linear "));
}

/// Each op's calls in one phase of a `flamingo profile --json` run, by op.
fn calls_by_op(v: &serde_json::Value, phase: &str) -> std::collections::BTreeMap<String, u64> {
    v["phases"][phase]["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["op"].as_str().unwrap().to_string(), o["calls"].as_u64().unwrap()))
        .collect()
}

#[test]
fn profile_repeats_reports_one_pass_not_their_sum() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.json");
    let once = json_of(&profile_tiny(&["--decode-steps", "2", "--json"]));
    let thrice = json_of(&profile_tiny(&[
        "--decode-steps",
        "2",
        "--repeats",
        "3",
        "--json",
        "--trace",
        trace.to_str().unwrap(),
    ]));
    for phase in ["prefill", "decode"] {
        assert_eq!(calls_by_op(&thrice, phase), calls_by_op(&once, phase), "{phase}");
    }
    // The trace keeps every pass: the warm-up and three measured ones.
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let count = |name: &str| {
        trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["cat"] == "phase" && e["name"] == name)
            .count()
    };
    assert_eq!((count("warm-up"), count("prefill"), count("decode")), (3, 3, 6));
}

#[test]
fn profile_refuses_zero_repeats() {
    let out = profile_tiny(&["--repeats", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--repeats must be positive"), "{err}");
}
