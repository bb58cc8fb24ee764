//! The small demo model and example picture the commands use when none is given, embedded in the binary so that
//! an installed `flamingo` (`cargo install --path .`) works from any directory without the source tree. They are
//! used, in order, from a `demo-model/` folder beside the binary (a packaged install), from the source tree the
//! binary was built from when it is still there, or written once from the embedded copy into the user's cache
//! (`$XDG_CACHE_HOME` or `~/.cache`, else the temporary folder) under a name that changes with their content.
//! `FLAMINGO_BUNDLED_FROM=embedded` skips the first two (to check the embedded copy where a tree is present).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The demo model's files, as `assets/demo-model` holds them.
const MODEL_FILES: [(&str, &[u8]); 6] = [
    ("config.json", include_bytes!("../../assets/demo-model/config.json")),
    ("generation_config.json", include_bytes!("../../assets/demo-model/generation_config.json")),
    ("model.safetensors", include_bytes!("../../assets/demo-model/model.safetensors")),
    ("preprocessor_config.json", include_bytes!("../../assets/demo-model/preprocessor_config.json")),
    ("tokenizer.json", include_bytes!("../../assets/demo-model/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../assets/demo-model/tokenizer_config.json")),
];

/// The example picture `flamingo generate` describes when given none.
const EXAMPLE_IMAGE: (&str, &[u8]) = ("shapes.png", include_bytes!("../../assets/examples/shapes.png"));

/// The demo model's folder (see the module doc for where it comes from).
pub fn bundled_model_dir() -> Result<PathBuf> {
    if embedded_only() {
        return extracted("demo-model", &MODEL_FILES);
    }
    let beside = beside_binary("demo-model");
    if let Some(dir) = beside.filter(|d| d.join("config.json").is_file()) {
        return Ok(dir);
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-model");
    if source.join("config.json").is_file() {
        return Ok(source);
    }
    extracted("demo-model", &MODEL_FILES)
}

/// The example picture's path (from the source tree, or extracted as the model is).
pub fn bundled_example_image() -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/examples").join(EXAMPLE_IMAGE.0);
    if source.is_file() && !embedded_only() {
        return Ok(source);
    }
    Ok(extracted("example", &[EXAMPLE_IMAGE])?.join(EXAMPLE_IMAGE.0))
}

fn embedded_only() -> bool {
    std::env::var_os("FLAMINGO_BUNDLED_FROM").is_some_and(|v| v == "embedded")
}

fn beside_binary(name: &str) -> Option<PathBuf> {
    Some(std::env::current_exe().ok()?.parent()?.join(name))
}

/// A folder holding `files`, written from the embedded bytes the first time (into a temporary folder renamed into
/// place, so a concurrent first run never sees half a model).
fn extracted(name: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    extract_into(&cache_root(), name, files)
}

fn extract_into(root: &Path, name: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let cache = root.join(format!("{name}-{:016x}", fingerprint(files)));
    if files.iter().all(|(f, bytes)| {
        std::fs::metadata(cache.join(f)).is_ok_and(|m| m.len() == bytes.len() as u64)
    }) {
        return Ok(cache);
    }
    let parent = cache.parent().expect("the cache folder has a parent");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let staging = parent.join(format!(".{name}-{}", std::process::id()));
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    for (f, bytes) in files {
        let path = staging.join(f);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    // An incomplete copy (a run stopped while writing, a file damaged) is replaced whole.
    if cache.exists() {
        let _ = std::fs::remove_dir_all(&cache);
    }
    match std::fs::rename(&staging, &cache) {
        Ok(()) => Ok(cache),
        // Another run put it there first: use theirs.
        Err(_) if cache.join(files[0].0).is_file() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(cache)
        }
        Err(e) => Err(Error::io(&cache, e)),
    }
}

fn cache_root() -> PathBuf {
    let home_cache = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"));
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or(home_cache)
        .unwrap_or_else(std::env::temp_dir)
        .join("flamingo")
}

/// FNV-1a over the files' names and bytes.
fn fingerprint(files: &[(&str, &[u8])]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in files {
        for &b in name.as_bytes().iter().chain(*bytes) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_files_are_extracted_once_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let first = extract_into(dir.path(), "demo-model", &MODEL_FILES).unwrap();
        assert!(first.starts_with(dir.path()));
        for (f, bytes) in MODEL_FILES {
            assert_eq!(std::fs::read(first.join(f)).unwrap(), bytes, "{f}");
        }
        // A second run finds it; a damaged copy is written again.
        assert_eq!(extract_into(dir.path(), "demo-model", &MODEL_FILES).unwrap(), first);
        std::fs::write(first.join("config.json"), b"{").unwrap();
        assert_eq!(extract_into(dir.path(), "demo-model", &MODEL_FILES).unwrap(), first);
        assert_eq!(std::fs::read(first.join("config.json")).unwrap(), MODEL_FILES[0].1);
    }
}
