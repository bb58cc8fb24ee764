//! What the engine agrees to read: regular files only (a FIFO or a device would block or never end), of a size
//! known before reading. Checked with `stat` before `open`, because opening a FIFO for reading already blocks.

use std::path::Path;

use crate::error::{Error, Result};

/// JSON files of a model directory (config, preprocessor, tokenizer config) at most.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// A tokenizer.json at most (the largest published are about 20 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;

/// The size of `path`, if it is a regular file (after following links) of at most `max_bytes`.
pub fn regular_file(path: &Path, max_bytes: u64) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let refuse = |why: String| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
        )
    };
    if !meta.is_file() {
        return Err(refuse(
            "not a regular file (a FIFO, device or directory is not read)".into(),
        ));
    }
    if meta.len() > max_bytes {
        return Err(refuse(format!(
            "{} bytes, over the limit of {max_bytes} bytes",
            meta.len()
        )));
    }
    Ok(meta.len())
}
