//! JSON-lines jobs (`flamingo batch`, `flamingo score`): every input line read as text or as the reason it is no
//! request, and results written in input order as they complete, one output line per input line.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::error::{Error, Result};

/// Every line of the input: its text, or why it is no request (blank, not UTF-8), answered in place so that output
/// line N always answers input line N.
pub fn read_lines(path: &Path) -> Result<Vec<std::result::Result<String, String>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let lines = body.split(|&b| b == b'\n').enumerate().map(|(i, raw)| {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        match std::str::from_utf8(raw) {
            Ok(text) if text.trim().is_empty() => Err(format!("line {}: blank line", i + 1)),
            Ok(text) => Ok(text.to_string()),
            Err(e) => Err(format!("line {}: not UTF-8 ({e})", i + 1)),
        }
    });
    Ok(lines.collect())
}

/// Results waiting to be written in input order.
pub struct OrderedOutput {
    results: Vec<Option<Value>>,
    written: usize,
    out: BufWriter<std::fs::File>,
    path: PathBuf,
    progress: ProgressBar,
}

impl OrderedOutput {
    /// Creates `path` for `lines` results; the progress bar counts `what`.
    pub fn create(path: &Path, lines: usize, what: &str) -> Result<Self> {
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let progress = ProgressBar::new(lines as u64);
        progress.set_style(
            ProgressStyle::with_template(&format!(
                "{{bar:40}} {{pos}}/{{len}} {what} {{elapsed}} eta {{eta}}"
            ))
            .expect("static template"),
        );
        Ok(OrderedOutput {
            results: vec![None; lines],
            written: 0,
            out: BufWriter::new(file),
            path: path.to_path_buf(),
            progress,
        })
    }

    /// Lines in the job.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// Stores line `line`'s result and writes every result now complete at the head of the input order.
    pub fn record(&mut self, line: usize, value: Value) -> Result<()> {
        self.results[line] = Some(value);
        self.progress.inc(1);
        while let Some(Some(v)) = self.results.get_mut(self.written).map(Option::take) {
            writeln!(self.out, "{v}").map_err(|e| Error::io(&self.path, e))?;
            self.written += 1;
        }
        Ok(())
    }

    /// Flushes the file and clears the progress bar.
    pub fn finish(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        self.progress.finish_and_clear();
        Ok(())
    }
}
