//! One error type for the whole engine. Every variant names the file, tensor, token or field at fault and, where it
//! applies, the expected and the actual value, so that a user can fix the input without reading the code.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("{path}: config field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },

    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("{path}: not a PyTorch checkpoint this engine can read: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("tensor `{name}` not found in {searched}")]
    MissingTensor { name: String, searched: String },

    #[error(
        "{path}: tensor `{name}` has shape {actual:?}, expected {expected:?} (from config.json)"
    )]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("{path}: tensor `{name}` has dtype {actual}, expected one of {expected}")]
    TensorDtype {
        path: PathBuf,
        name: String,
        expected: String,
        actual: String,
    },

    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("{path}: image: {message}")]
    Image { path: PathBuf, message: String },

    #[error("prompt: {0}")]
    Prompt(String),

    #[error("token id {id} ({token}) is beyond the {rows} embedding rows of the model (vocab_size + additional_vocab_size); the tokenizer lists more tokens than the weights hold")]
    TokenOutOfRange { id: u32, token: String, rows: usize },

    #[error("device `{0}` is not available: {1}")]
    Device(String, String),

    #[error("{0}")]
    Invalid(String),

    /// The engine failed a request it had accepted (not the request's fault).
    #[error("engine error: {0}")]
    Engine(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn config(path: impl Into<PathBuf>, field: &str, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}
