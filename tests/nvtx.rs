//! NVTX ranges without a GPU: with no tool attached a range costs next to nothing and the program runs as always;
//! a bad `NVTX_INJECTION64_PATH` is reported on stderr and never fails the program; and a stand-in tool
//! (`tests/common/nvtx_tool.c`, built here with the C compiler the build already needs) attaches through the same
//! export tables Nsight's injection library uses and sees `flamingo profile`'s phases as nested ranges.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use flamingo::nvtx;

/// Builds the stand-in tool with `defines` into `dir`.
fn build_tool(dir: &Path, defines: &[&str]) -> PathBuf {
    let lib = dir.join("libfake_nvtx_tool.so");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/nvtx_tool.c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&source)
        .args(defines.iter().map(|d| format!("-D{d}")))
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc}: {e}"));
    assert!(status.success(), "{cc} failed on {}", source.display());
    lib
}

/// `flamingo profile` on the tiny synthetic model, with `NVTX_INJECTION64_PATH=tool` and the tool's log in `log`.
fn profile_with_tool(tool: &Path, log: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["profile", "--synthetic", "tiny", "--device", "cpu"])
        .args(["--decode-steps", "2", "--prompt-tokens", "4"])
        .env(nvtx::INJECTION_VAR, tool)
        .env("FAKE_NVTX_LOG", log)
        .output()
        .unwrap()
}

#[test]
fn ranges_cost_next_to_nothing_without_a_tool() {
    if std::env::var_os(nvtx::INJECTION_VAR).is_some() {
        eprintln!(
            "skipped: a tool is attached ({} is set)",
            nvtx::INJECTION_VAR
        );
        return;
    }
    assert!(matches!(nvtx::status(), nvtx::Status::Off));
    let start = Instant::now();
    for i in 0..100_000 {
        let _outer = nvtx::range("outer");
        let _inner = nvtx::range(if i % 2 == 0 { "even" } else { "odd" });
    }
    let seconds = start.elapsed().as_secs_f64();
    // 200,000 ranges: a few hundred microseconds when each is one read of an initialised static.
    assert!(
        seconds < 0.5,
        "200k ranges with no tool took {seconds:.3} s"
    );
}

#[test]
fn a_tool_sees_the_phases_as_nested_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let tool = build_tool(dir.path(), &[]);
    let log = dir.path().join("ranges.log");
    let out = profile_with_tool(&tool, &log);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "profile failed: {stderr}");
    assert!(
        !stderr.contains("NVTX ranges are off"),
        "the tool attached, yet: {stderr}"
    );
    let text = std::fs::read_to_string(&log).expect("the tool wrote its log");
    let lines: Vec<&str> = text.lines().collect();
    // The program's tables: CORE, CUDA, OPENCL, CUDART, CORE2, SYNC slot counts as NVTX v3 defines them.
    assert_eq!(lines[0], "modules 16 9 15 7 16 7");
    // The workload runs twice: as phase "warm-up", then measured.
    let want = [
        "push warm-up",
        "push vision",
        "pop",
        "pop",
        "push warm-up",
        "push warm-up step 1",
        "pop",
        "push warm-up step 2",
        "pop",
        "pop",
        "push prefill",
        "push vision",
        "pop",
        "pop",
        "push decode",
        "push decode step 1",
        "pop",
        "push decode step 2",
        "pop",
        "pop",
    ];
    assert_eq!(&lines[1..], want, "ranges as the tool saw them");
}

#[test]
fn a_bad_tool_path_is_reported_and_never_fails_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-tool.so");
    let cases = [
        (missing, "cannot be loaded".to_string()),
        (
            build_tool(dir.path(), &["NO_ENTRY"]),
            "has no InitializeInjectionNvtx2".to_string(),
        ),
    ];
    for (tool, message) in cases {
        let out = profile_with_tool(&tool, &dir.path().join("unused.log"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{}: profile failed: {stderr}",
            tool.display()
        );
        let line = format!(
            "NVTX ranges are off: {}={}",
            nvtx::INJECTION_VAR,
            tool.display()
        );
        assert!(
            stderr.contains(&line) && stderr.contains(&message),
            "{}: stderr lacks `{line} .. {message}`:\n{stderr}",
            tool.display()
        );
        assert_eq!(
            stderr.matches("NVTX ranges are off").count(),
            1,
            "reported once: {stderr}"
        );
    }
}

#[test]
fn a_tool_that_refuses_to_attach_leaves_the_ranges_off() {
    let dir = tempfile::tempdir().unwrap();
    let tool = build_tool(dir.path(), &["REFUSE"]);
    let log = dir.path().join("ranges.log");
    let out = profile_with_tool(&tool, &log);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "profile failed: {stderr}");
    assert!(
        stderr.contains("InitializeInjectionNvtx2 refused to attach"),
        "{stderr}"
    );
    assert!(!log.exists(), "a refusing tool was called back");
}
