//! A model's own Jinja chat template, rendered as transformers renders it (`apply_chat_template`,
//! `utils/chat_template_utils.py`): found in `chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`
//! (in that order), run with `trim_blocks` and `lstrip_blocks`, Python string methods (`.strip()`, ...), and the
//! globals transformers defines: `raise_exception` (its message becomes the error) and `strftime_now`. Rendering
//! is bounded (minijinja fuel), so a hostile template cannot loop forever.

use std::path::{Path, PathBuf};

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::io::config::read_json;

/// Template instructions one render may execute: far beyond any chat, short of a hang.
const FUEL: u64 = 5_000_000;

/// Bytes a rendered prompt may reach.
const MAX_RENDERED_BYTES: usize = 16 << 20;

pub struct ChatTemplate {
    source: String,
    /// The file it was read from (for messages).
    pub origin: PathBuf,
    bos_token: String,
    eos_token: String,
}

/// `chat_template` as tokenizer_config.json writes it: one template, or named ones (`default` is used).
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize)]
struct WithTemplate {
    chat_template: Option<TemplateField>,
}

impl TemplateField {
    fn default_template(self) -> Option<String> {
        match self {
            TemplateField::One(t) => Some(t),
            TemplateField::Named(list) => list.into_iter().find(|t| t.name == "default").map(|t| t.template),
        }
    }
}

impl ChatTemplate {
    /// The template a model directory ships, if any; `bos_token` and `eos_token` are what templates see by those
    /// names.
    pub fn from_model_dir(dir: &Path, bos_token: &str, eos_token: &str) -> Result<Option<Self>> {
        let jinja = dir.join("chat_template.jinja");
        let found = if jinja.exists() {
            crate::io::files::regular_file(&jinja, crate::io::files::MAX_JSON_BYTES)?;
            Some((std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?, jinja))
        } else {
            ["chat_template.json", "tokenizer_config.json"]
                .iter()
                .map(|name| dir.join(name))
                .filter(|path| path.exists())
                .find_map(|path| match read_json::<WithTemplate>(&path) {
                    Ok(w) => w.chat_template.and_then(TemplateField::default_template).map(|t| Ok((t, path))),
                    Err(e) => Some(Err(e)),
                })
                .transpose()?
        };
        let Some((source, origin)) = found else {
            return Ok(None);
        };
        let template = ChatTemplate {
            source,
            origin,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        };
        // Syntax errors surface when the model loads, not at the first request.
        template.environment().template_from_str(&template.source).map_err(|e| template.error(e))?;
        Ok(Some(template))
    }

    /// The prompt for `messages` (transformers' format: `role`, `content` as a string or a list of
    /// `{"type": "text", "text"}` / `{"type": "image"}` parts), with the assistant's turn opened when
    /// `add_generation_prompt`; `extra` adds template variables (e.g. `date_string`).
    pub fn render(&self, messages: &Value, add_generation_prompt: bool, extra: &Map<String, Value>) -> Result<String> {
        let env = self.environment();
        let template = env.template_from_str(&self.source).map_err(|e| self.error(e))?;
        let mut context = extra.clone();
        context.insert("messages".into(), messages.clone());
        context.insert("add_generation_prompt".into(), add_generation_prompt.into());
        context.insert("bos_token".into(), self.bos_token.clone().into());
        context.insert("eos_token".into(), self.eos_token.clone().into());
        let context = minijinja::Value::from(minijinja::value::Serde(Value::Object(context)));
        let text = template.render(context).map_err(|e| self.error(e))?;
        if text.len() > MAX_RENDERED_BYTES {
            return Err(Error::Prompt(format!(
                "chat template {}: the rendered prompt is {} bytes, over the {MAX_RENDERED_BYTES}-byte limit",
                self.origin.display(),
                text.len()
            )));
        }
        Ok(text)
    }

    fn environment(&self) -> Environment<'static> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env
    }

    /// A template failure as the prompt error it is: `raise_exception`'s message as written, others with
    /// minijinja's description.
    fn error(&self, e: minijinja::Error) -> Error {
        let message = match (e.kind(), e.detail()) {
            (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
            _ => e.to_string(),
        };
        Error::Prompt(format!("chat template {}: {message}", self.origin.display()))
    }
}

/// `datetime.now().strftime(format)` for the directives chat templates use (`%d %b %Y` and kin), in UTC.
fn strftime_now(format: &str) -> std::result::Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(format_date(secs / 86_400, format))
}

const MONTHS: [&str; 12] = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
];

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31): the proleptic Gregorian calendar.
fn civil_from_days(days: u64) -> (i64, usize, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as usize;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn format_date(days: u64, format: &str) -> String {
    let (year, month, day) = civil_from_days(days);
    let name = MONTHS[month - 1];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate {
            source: source.into(),
            origin: PathBuf::from("test.jinja"),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        }
    }

    fn render(source: &str) -> Result<String> {
        template(source).render(&serde_json::json!([]), true, &Map::new())
    }

    #[test]
    fn blocks_are_trimmed_and_stripped_as_transformers_does() {
        assert_eq!(render("  {% if true %}\nx{% endif %}\n").unwrap(), "x");
        assert_eq!(render("{{ bos_token }}{{ ' a '.strip() }}").unwrap(), "<s>a");
    }

    #[test]
    fn raise_exception_is_the_error_and_runaway_templates_stop() {
        let e = render("{{ raise_exception('no images here') }}").unwrap_err().to_string();
        assert!(e.contains("test.jinja: no images here"), "{e}");
        let e = render("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fuel"), "{e}");
    }

    #[test]
    fn dates_format_as_python_does() {
        // 2024-07-26 is day 19930 since the epoch.
        assert_eq!(format_date(19_930, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(format_date(0, "%Y-%m-%d %B %y %%"), "1970-01-01 January 70 %");
        assert_eq!(format_date(11_016, "%d %b %Y"), "29 Feb 2000");
    }
}
