//! Streaming a request's text as tokens arrive, holding back anything that may turn out to be a stop string.

/// Incremental text output that never emits a stop string or a prefix of one that may still complete.
pub struct TextStream {
    stops: Vec<String>,
    emitted: usize,
    stopped_at: Option<usize>,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        TextStream {
            stops,
            emitted: 0,
            stopped_at: None,
        }
    }

    /// Emits what is safe of `text`; true when a stop string appeared.
    pub fn update(&mut self, text: &str, out: &mut impl FnMut(&str)) -> bool {
        if let Some(pos) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            self.stopped_at = Some(pos);
            self.emit_to(text, pos, out);
            return true;
        }
        let hold = self
            .stops
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut safe = text.len().saturating_sub(hold);
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        // A trailing U+FFFD is usually half of a multi-byte character whose other tokens are still to come.
        let safe = text[..safe].trim_end_matches('\u{FFFD}').len();
        self.emit_to(text, safe, out);
        false
    }

    fn emit_to(&mut self, text: &str, end: usize, out: &mut impl FnMut(&str)) {
        if end > self.emitted && text.is_char_boundary(self.emitted) {
            out(&text[self.emitted..end]);
            self.emitted = end;
        }
    }

    /// Flushes the rest and returns the final text (cut at the stop string if one appeared).
    pub fn finish(&mut self, text: &str, out: &mut impl FnMut(&str)) -> String {
        let end = self.stopped_at.unwrap_or(text.len()).min(text.len());
        self.emit_to(text, end, out);
        text[..end].to_string()
    }
}
