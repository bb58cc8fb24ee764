//! `flamingo generate`: one prompt, its images, tokens streamed to stdout (or one JSON object with `--json`).

use std::io::Write;
use std::path::PathBuf;

use crate::backend::Backend;
use crate::cli::bundled::bundled_example_image;
use crate::cli::options::{bundled_model_dir, with_backend, BackendCommand, OpenFlamingoPartsArgs, RunOptions};
use crate::error::{Error, Result};
use crate::io::tokenizer::{END_OF_UTTERANCE, IMAGE_TOKEN};
use crate::model::sampling::SamplingParams;
use crate::runtime::pipeline::{ModelPaths, Pipeline};
use crate::runtime::request::GenerationRequest;

/// The picture described when neither `--prompt` nor `--image` is given (the bundled model was trained on such
/// pictures; see tools/demo_model).

/// The prompt used when none is given: IDEFICS' instruct format, one `<image>` per image, the user turn closed by
/// `<end_of_utterance>` where the tokenizer has that token (the instruct checkpoints and the bundled model were
/// trained so; the base checkpoints' tokenizers lack it and get the plain `User:<image>Describe this
/// image.\nAssistant:`).
pub fn describe_prompt(num_images: usize, end_of_utterance: bool) -> String {
    let markers = IMAGE_TOKEN.repeat(num_images);
    let eou = if end_of_utterance {
        END_OF_UTTERANCE
    } else {
        ""
    };
    format!("User:{markers}Describe this image.{eou}\nAssistant:")
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face model directory (IDEFICS, Llama 3.2 Vision) or an OpenFlamingo folder (its checkpoint.pt;
    /// default: the small IDEFICS model bundled with the repository).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    parts: OpenFlamingoPartsArgs,
    /// Prompt text exactly as the model's processor takes it: IDEFICS text with `<image>` where each image goes,
    /// Llama 3.2 Vision's rendered chat with `<|image|>` (default: describe the image). With --chat: the user's
    /// message.
    #[arg(long)]
    prompt: Option<String>,
    /// Render the prompt with the model's own chat template: --prompt is the user's message, the images come
    /// before its text.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message first.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// With --chat: a template variable, KEY=VALUE (e.g. date_string="26 Jul 2024"); repeatable.
    #[arg(long = "template-var", requires = "chat")]
    template_vars: Vec<String>,
    /// An image file (PNG, JPEG, WebP, GIF); repeat for several, in the order of the `<image>` markers.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0 = greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this string (repeatable); the string itself is not printed.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Refuse images with more pixels than this.
    #[arg(long, default_value_t = crate::io::image::DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
    /// Print one JSON object {"prompt_ids", "generated_ids", "text", "finish_reason"} instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: RunOptions,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let paths = args.parts.paths(&args.model.clone().map_or_else(bundled_model_dir, Ok)?);
    with_backend(&args.run.clone(), &paths.clone(), Generate { args, paths })
}

struct Generate {
    args: GenerateArgs,
    paths: ModelPaths,
}

impl BackendCommand for Generate {
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        run_on(self.args, self.paths, backend)
    }
}

fn run_on<B: Backend>(args: GenerateArgs, paths: ModelPaths, backend: B) -> Result<()> {
    let images = match (&args.prompt, args.images.is_empty()) {
        (None, true) => vec![bundled_example_image()?],
        _ => args.images.clone(),
    };
    let mut pipeline = Pipeline::load_paths(&paths, backend, !args.json)?;
    let prompt = match &args.prompt {
        Some(p) => p.clone(),
        None => describe_prompt(
            images.len(),
            pipeline.tokenizer.end_of_utterance_id.is_some(),
        ),
    };
    pipeline.max_image_pixels = args.max_image_pixels;
    let prompt = match args.chat {
        true => {
            let text = args.prompt.as_deref().unwrap_or("Describe this image.");
            chat_prompt(&pipeline, &args, text, images.len())?
        }
        false => prompt,
    };
    let (encoded, pixels) = pipeline.prepare(&prompt, &images)?;
    let request = GenerationRequest {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop: args.stop.clone(),
        ignore_eos: false,
        prompt_logprobs: None,
    };
    let mut stdout = std::io::stdout().lock();
    let out = if args.json {
        pipeline.generate(&encoded, pixels, &request, |_| {})?
    } else {
        pipeline.generate(&encoded, pixels, &request, |piece| {
            // A closed stdout (e.g. `| head`) is not worth failing the generation for.
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        })?
    };
    if args.json {
        let json = serde_json::json!({
            "prompt_ids": out.prompt_ids,
            "generated_ids": out.generated_ids,
            "text": out.text,
            "finish_reason": out.finish_reason.as_str(),
        });
        writeln!(stdout, "{json}").map_err(|e| Error::io("<stdout>", e))?;
    } else {
        writeln!(stdout).map_err(|e| Error::io("<stdout>", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_prompt_closes_the_user_turn_only_where_the_tokenizer_can() {
        assert_eq!(
            describe_prompt(1, true),
            "User:<image>Describe this image.<end_of_utterance>\nAssistant:"
        );
        assert_eq!(
            describe_prompt(2, false),
            "User:<image><image>Describe this image.\nAssistant:"
        );
    }
}

/// The prompt the model's chat template makes of an optional system message and one user message with the
/// images first, then the text.
fn chat_prompt<B: Backend>(p: &Pipeline<B>, args: &GenerateArgs, text: &str, images: usize) -> Result<String> {
    let template = p.chat_template.as_ref().ok_or_else(|| {
        Error::Invalid(format!(
            "--chat: {} has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json's \
             chat_template)",
            p.dir.display()
        ))
    })?;
    let mut vars = serde_json::Map::new();
    for var in &args.template_vars {
        let (key, value) = var
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("--template-var {var:?}: expected KEY=VALUE")))?;
        vars.insert(key.to_string(), value.into());
    }
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(serde_json::json!({"role": "system", "content": system}));
    }
    let mut content: Vec<serde_json::Value> = (0..images).map(|_| serde_json::json!({"type": "image"})).collect();
    content.push(serde_json::json!({"type": "text", "text": text}));
    messages.push(serde_json::json!({"role": "user", "content": content}));
    template.render(&serde_json::Value::Array(messages), true, &vars)
}
