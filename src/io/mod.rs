//! Everything read from disk: model directories (config, safetensors, tokenizer) and images, plus prompt building.

pub mod chat_template;
pub mod config;
pub mod files;
pub mod image;
pub mod mllama_config;
pub mod mllama_image;
pub mod openflamingo_config;
pub mod openflamingo_image;
pub mod prompt;
pub mod pytorch;
pub mod safetensors;
pub mod tokenizer;
