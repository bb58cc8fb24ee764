//! JSON-lines jobs (`flamingo batch`, `flamingo score`): every input line read as text or as the reason it is no
//! request, each line's engine requests followed to its result, and results written in input order as they
//! complete, one output line per input line.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::runtime::engine::Event;
use crate::runtime::request::GenerationOutput;
use crate::runtime::scheduler::RequestId;

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

/// The engine requests each line of a job runs (a batch line's choices, a score line's candidates), with what the
/// line needs to write its result: a line is done when all of them are, and fails when one fails.
pub struct LineGroups<P> {
    member: HashMap<RequestId, (usize, usize)>,
    lines: HashMap<usize, Group<P>>,
}

struct Group<P> {
    payload: P,
    outputs: Vec<Option<GenerationOutput>>,
    left: usize,
}

/// What a finished request means for its line.
pub enum LineOutcome<P> {
    /// The line's last request finished: its payload and every output, in request order.
    Done(usize, P, Vec<GenerationOutput>),
    /// A request of the line failed; its other requests are cancelled.
    Failed(usize, P, String),
}

impl<P> LineGroups<P> {
    pub fn new() -> Self {
        LineGroups {
            member: HashMap::new(),
            lines: HashMap::new(),
        }
    }

    /// Requests queued and not finished.
    pub fn requests(&self) -> usize {
        self.member.len()
    }

    /// Line `line` runs `ids` (in order).
    pub fn add(&mut self, line: usize, ids: &[RequestId], payload: P) {
        for (k, &id) in ids.iter().enumerate() {
            self.member.insert(id, (line, k));
        }
        let group = Group {
            payload,
            outputs: (0..ids.len()).map(|_| None).collect(),
            left: ids.len(),
        };
        self.lines.insert(line, group);
    }

    /// Takes an engine event; a finished line comes back. `cancel` drops the other requests of a failed line.
    pub fn take(
        &mut self,
        event: Event,
        mut cancel: impl FnMut(RequestId),
    ) -> Option<LineOutcome<P>> {
        let (id, result) = match event {
            Event::Finished { id, output } => (id, Ok(output)),
            Event::Failed { id, message } => (id, Err(message)),
            _ => return None,
        };
        // A request of a line that has failed in this step already is not known any more.
        let (line, k) = self.member.remove(&id)?;
        match result {
            Ok(output) => {
                let group = self.lines.get_mut(&line)?;
                group.outputs[k] = Some(output);
                group.left -= 1;
                if group.left > 0 {
                    return None;
                }
                let group = self.lines.remove(&line)?;
                let outputs = group.outputs.into_iter().flatten().collect();
                Some(LineOutcome::Done(line, group.payload, outputs))
            }
            Err(message) => {
                let group = self.lines.remove(&line)?;
                self.member.retain(|&other, &mut (l, _)| {
                    if l == line {
                        cancel(other);
                    }
                    l != line
                });
                Some(LineOutcome::Failed(line, group.payload, message))
            }
        }
    }
}
