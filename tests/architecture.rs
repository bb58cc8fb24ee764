//! The architecture `src/lib.rs` states, checked on the sources: every file of `src/` uses only modules of its own
//! layer or the layers below it, and no files depend on each other in a cycle. A file depends on another when it
//! names a path into it: `crate::…`, `super::…`, `self::…`, a child module's `child::…`, `use` groups included
//! (comments and `#[cfg(test)]` modules left out). `cargo test --release --test architecture` runs just this.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path from the crate root: `["runtime", "engine"]` for `src/runtime/engine.rs`.
type Module = Vec<String>;

struct SourceFile {
    module: Module,
    path: PathBuf,
    /// The code without comments and test modules.
    code: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every file of the library (not the binary's `main.rs`), with the module it defines.
fn source_files() -> Vec<SourceFile> {
    let mut paths = Vec::new();
    collect_rs(&src_dir(), &mut paths);
    paths
        .into_iter()
        .filter(|p| !p.ends_with("main.rs"))
        .map(|path| {
            let rel = path.strip_prefix(src_dir()).expect("under src/");
            let mut module: Module = rel
                .with_extension("")
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).expect("readable source");
            SourceFile {
                module,
                code: without_test_modules(&without_comments(&text)),
                path,
            }
        })
        .collect()
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src/") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code with `//` and `/* */` comments blanked (string literals kept, so `"http://…"` stays whole).
fn without_comments(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            out.push_str(&text[start..i]);
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
            i = end;
            out.push(' ');
        } else {
            let c = text[i..].chars().next().expect("in bounds");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// The code without the bodies of test modules (`#[cfg(test)] mod … { … }`, `#[cfg(all(test, …))]` too): their
/// `super::` means the file itself.
fn without_test_modules(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(") {
        out.push_str(&rest[..at]);
        let attr_end = rest[at..].find(']').map_or(rest.len(), |e| at + e + 1);
        let attr = &rest[at..attr_end];
        let after = &rest[attr_end..];
        let head = after.split(['{', ';']).next().unwrap_or("");
        let words: Vec<&str> = head.split_whitespace().collect();
        let is_test_module = attr
            .split(|c: char| !is_ident_char(c as u8))
            .any(|w| w == "test")
            && matches!(words.as_slice(), ["mod", _] | ["pub", "mod", _])
            && after[head.len()..].starts_with('{');
        if !is_test_module {
            out.push_str(attr);
            rest = after;
            continue;
        }
        let open = head.len();
        let mut depth = 0;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The child modules a file declares (`mod x;`, `pub mod x;`).
fn declared_children(code: &str) -> BTreeSet<String> {
    code.split(';')
        .filter_map(|stmt| {
            let words: Vec<&str> = stmt.split_whitespace().collect();
            match words.as_slice() {
                [.., "mod", name] if name.bytes().all(is_ident_char) => Some(name.to_string()),
                _ => None,
            }
        })
        .collect()
}

/// Every path the code names that starts at one of `roots` (`crate`, `super`, `self`, a child module), expanded
/// through `use` groups: `crate::a::{b, c::d}` gives `crate::a::b` and `crate::a::c::d`.
fn paths_from(code: &str, roots: &BTreeSet<String>) -> Vec<Vec<String>> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let starts_word =
            (i == 0 || !is_ident_char(b[i - 1]) && b[i - 1] != b':') && is_ident_char(b[i]);
        if !starts_word {
            i += 1;
            continue;
        }
        let word_end = i + b[i..].iter().take_while(|&&c| is_ident_char(c)).count();
        // `pub(in crate::a)` names a visibility, not a dependency.
        let in_visibility = code[..i]
            .trim_end()
            .strip_suffix("in")
            .is_some_and(|p| p.trim_end().ends_with('('));
        if roots.contains(&code[i..word_end])
            && code[word_end..].starts_with("::")
            && !in_visibility
        {
            let (paths, end) = parse_path(code, i);
            out.extend(paths);
            i = end;
        } else {
            i = word_end;
        }
    }
    out
}

/// The paths of the path (or `use` tree) starting at `start`, and where it ends.
fn parse_path(code: &str, start: usize) -> (Vec<Vec<String>>, usize) {
    let b = code.as_bytes();
    let skip_space = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut i = skip_space(start);
    let end = i + b[i..].iter().take_while(|&&c| is_ident_char(c)).count();
    let mut prefix = vec![code[i..end].to_string()];
    i = end;
    loop {
        let j = skip_space(i);
        if !code[j..].starts_with("::") {
            return (vec![prefix], i);
        }
        i = skip_space(j + 2);
        if i < b.len() && b[i] == b'{' {
            let mut paths = Vec::new();
            i += 1;
            loop {
                i = skip_space(i);
                if i >= b.len() || b[i] == b'}' {
                    return (paths, i + 1);
                }
                if b[i] == b',' {
                    i += 1;
                    continue;
                }
                if b[i] == b'*' {
                    paths.push(prefix.clone());
                    i += 1;
                    continue;
                }
                let (inner, next) = parse_path(code, i);
                for p in inner {
                    let mut full = prefix.clone();
                    full.extend(p.into_iter().filter(|s| s != "self"));
                    paths.push(full);
                }
                i = next;
                // `name as alias`
                let j = skip_space(i);
                if code[j..].starts_with("as ") {
                    i = skip_space(j + 3);
                    i += b[i..].iter().take_while(|&&c| is_ident_char(c)).count();
                }
            }
        }
        let seg = b[i..].iter().take_while(|&&c| is_ident_char(c)).count();
        if seg == 0 {
            return (vec![prefix], i);
        }
        prefix.push(code[i..i + seg].to_string());
        i += seg;
    }
}

/// The file-level dependency graph: for each module, the modules (files) it names.
fn dependencies(files: &[SourceFile]) -> BTreeMap<Module, BTreeSet<Module>> {
    let known: BTreeSet<Module> = files.iter().map(|f| f.module.clone()).collect();
    let mut graph = BTreeMap::new();
    for f in files {
        let children = declared_children(&f.code);
        let mut roots: BTreeSet<String> = ["crate", "super", "self"].map(String::from).into();
        roots.extend(children.iter().cloned());
        let mut deps = BTreeSet::new();
        for path in paths_from(&f.code, &roots) {
            let Some(absolute) = absolute(&f.module, &children, &path) else {
                continue;
            };
            let target = (0..=absolute.len())
                .rev()
                .map(|n| absolute[..n].to_vec())
                .find(|m| known.contains(m));
            if let Some(t) = target.filter(|t| *t != f.module) {
                deps.insert(t);
            }
        }
        graph.insert(f.module.clone(), deps);
    }
    graph
}

/// `path` as seen from `module` (which declares `children`), from the crate root.
fn absolute(module: &Module, children: &BTreeSet<String>, path: &[String]) -> Option<Module> {
    let mut segs = path.iter().peekable();
    let mut base: Module = match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segs.next();
            Vec::new()
        }
        Some("self") => {
            segs.next();
            module.clone()
        }
        Some("super") => module.clone(),
        Some(child) if children.contains(child) => module.clone(),
        _ => return None,
    };
    while segs.peek().is_some_and(|s| *s == "super") {
        segs.next();
        base.pop()?;
    }
    base.extend(segs.cloned());
    Some(base)
}

/// The layers `src/lib.rs` states, top first: the names in backquotes on each `//! - ` line before its colon.
fn stated_layers() -> Vec<Vec<String>> {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).expect("src/lib.rs");
    let layers: Vec<Vec<String>> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//! - "))
        .map(|item| {
            let names = item.split(':').next().unwrap_or("");
            names
                .split('`')
                .skip(1)
                .step_by(2)
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|names| !names.is_empty())
        .collect();
    assert!(
        layers.len() >= 3,
        "src/lib.rs states no layers (lines \"//! - `name`: …\", top first)"
    );
    layers
}

fn file_of(files: &[SourceFile], m: &Module) -> String {
    files
        .iter()
        .find(|f| f.module == *m)
        .map(|f| {
            f.path
                .strip_prefix(src_dir().parent().expect("crate root"))
                .unwrap_or(&f.path)
                .display()
                .to_string()
        })
        .unwrap_or_else(|| m.join("::"))
}

#[test]
fn every_file_uses_only_its_layer_and_those_below() {
    let files = source_files();
    let layers = stated_layers();
    let rank = |m: &Module| {
        layers
            .iter()
            .position(|l| m.first().is_some_and(|top| l.contains(top)))
    };
    let mut problems = Vec::new();
    for f in files.iter().filter(|f| !f.module.is_empty()) {
        if rank(&f.module).is_none() {
            problems.push(format!(
                "{} is in none of src/lib.rs's layers",
                file_of(&files, &f.module)
            ));
        }
    }
    for (from, deps) in dependencies(&files) {
        let Some(r_from) = rank(&from) else { continue };
        for to in deps.iter().filter(|t| !t.is_empty()) {
            if rank(to).is_some_and(|r_to| r_to < r_from) {
                problems.push(format!(
                    "{} (layer `{}`) uses {} (layer `{}`, above it)",
                    file_of(&files, &from),
                    from[0],
                    file_of(&files, to),
                    to[0]
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn no_files_depend_on_each_other_in_a_cycle() {
    let files = source_files();
    let graph = dependencies(&files);
    let cycles = cycles(&graph);
    let described: Vec<String> = cycles
        .iter()
        .map(|c| {
            let edges: Vec<String> = c
                .iter()
                .flat_map(|a| {
                    graph[a]
                        .iter()
                        .filter(|b| c.contains(b))
                        .map(|b| format!("{} -> {}", file_of(&files, a), file_of(&files, b)))
                        .collect::<Vec<_>>()
                })
                .collect();
            edges.join(", ")
        })
        .collect();
    assert!(
        cycles.is_empty(),
        "dependency cycles:\n  {}",
        described.join("\n  ")
    );
}

/// The checks see what they should: a parent's child path, a `super` path and a `use` group are dependencies;
/// comments and test modules are not.
#[test]
fn the_parser_finds_paths_and_ignores_comments_and_tests() {
    let code = without_test_modules(&without_comments(
        "mod child;\nuse crate::a::{b::C, d as e, self};\n// use crate::commented::X;\nfn f() { super::g(); \
         child::h(); let s = \"crate::in_string\"; }\n#[cfg(test)]\nmod tests {\n    use crate::tested::Y;\n}\n\
         #[cfg(all(test, unix))]\nmod more_tests { use crate::tested::Z; }\n#[cfg(unix)]\nuse crate::kept::W;\npub(in crate::visibility) fn v() {}\n",
    ));
    let roots: BTreeSet<String> = ["crate", "super", "self", "child"].map(String::from).into();
    let joined: BTreeSet<String> = paths_from(&code, &roots)
        .iter()
        .map(|p| p.join("::"))
        .collect();
    for want in [
        "crate::a::b::C",
        "crate::a::d",
        "crate::a",
        "super::g",
        "child::h",
        "crate::kept::W",
    ] {
        assert!(joined.contains(want), "{want} not found in {joined:?}");
    }
    assert!(
        !joined
            .iter()
            .any(|p| p.contains("commented") || p.contains("tested")),
        "{joined:?}"
    );
    let module: Module = vec!["x".into(), "y".into()];
    let children = declared_children(&code);
    assert_eq!(
        absolute(&module, &children, &["super".into(), "g".into()]),
        Some(vec!["x".into(), "g".into()])
    );
    assert_eq!(
        absolute(&module, &children, &["child".into(), "h".into()]),
        Some(vec!["x".into(), "y".into(), "child".into(), "h".into()])
    );
}

/// The strongly connected components of more than one file (Tarjan's algorithm).
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct Walk<'g> {
        graph: &'g BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'g Module, usize>,
        low: BTreeMap<&'g Module, usize>,
        stack: Vec<&'g Module>,
        found: Vec<Vec<Module>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, v: &'g Module) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            let graph = self.graph;
            for w in graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(&w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    component.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.found
}
