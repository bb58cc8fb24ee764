//! Every kernel file's header names its oracle: the CPU reference it must match, the parity test that checks it
//! (on the simulated device in CI), and the criterion bench that measures it, as `path::function` lines
//! (`// CPU reference: src/backend/cpu/mod.rs::rope_rotate`). This test fails when a header is missing one, or
//! names a file or function that does not exist (a rename the header did not follow).

use std::path::{Path, PathBuf};

const LABELS: [&str; 3] = ["CPU reference", "Test", "Bench"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn kernel_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("kernels"))
        .expect("kernels/ exists")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    files
}

/// The `path::function` entries of a header line `// <label>: a::f, b::g` (continued on `//   ` lines).
fn entries(header: &str, label: &str) -> Vec<String> {
    let prefix = format!("// {label}: ");
    let mut lines = header.lines().skip_while(|l| !l.starts_with(&prefix));
    let Some(first) = lines.next() else {
        return Vec::new();
    };
    let continued = lines.take_while(|l| l.starts_with("//   "));
    std::iter::once(&first[prefix.len()..])
        .chain(continued.map(|l| &l[2..]))
        .flat_map(|l| l.split(','))
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

/// Why `entry` (`path::function`) does not name a function, if it does not.
fn missing(entry: &str) -> Option<String> {
    let Some((path, function)) = entry.rsplit_once("::") else {
        return Some(format!("{entry:?} is not path::function"));
    };
    let Ok(text) = std::fs::read_to_string(root().join(path)) else {
        return Some(format!("{path} does not exist"));
    };
    let defined = [format!("fn {function}("), format!("fn {function}<")];
    (!defined.iter().any(|d| text.contains(d.as_str())))
        .then(|| format!("{path} defines no fn {function}"))
}

fn header_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("readable kernel");
    text.lines()
        .take_while(|l| l.starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_kernel_header_names_an_existing_cpu_reference_test_and_bench() {
    let files = kernel_files();
    assert!(files.len() >= 10, "the kernels are found");
    let mut problems = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        let header = header_of(path);
        for label in LABELS {
            let found = entries(&header, label);
            if found.is_empty() {
                problems.push(format!("{name}: no `// {label}:` line"));
            }
            problems.extend(
                found
                    .iter()
                    .filter_map(|e| missing(e))
                    .map(|m| format!("{name}: {m}")),
            );
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_header_reader_finds_continued_lines_and_missing_functions() {
    let header = "// x.cu\n// Test: tests/gpu.rs::a, tests/gpu.rs::b,\n//   tests/gpu.rs::c\n// Bench: none\n";
    assert_eq!(
        entries(header, "Test"),
        ["tests/gpu.rs::a", "tests/gpu.rs::b", "tests/gpu.rs::c"]
    );
    assert!(entries(header, "CPU reference").is_empty());
    assert!(missing("tests/gpu.rs::rope_matches_cpu").is_none());
    assert!(missing("tests/gpu.rs::no_such_test").is_some());
    assert!(missing("tests/none.rs::f").is_some());
    assert!(missing("none").is_some());
}
