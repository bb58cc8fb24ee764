//! `flamingo generate`: one prompt, its images, tokens streamed to stdout (or one JSON object with `--json`).

use std::io::Write;
use std::path::PathBuf;

use crate::backend::Backend;
use crate::cli::{bundled_model_dir, with_backend, BackendCommand, RunOptions};
use crate::error::{Error, Result};
use crate::model::sampling::SamplingParams;
use crate::runtime::generate::{GenerationRequest, Pipeline};

/// The prompt used when none is given: IDEFICS' describe-this-image format.
const DESCRIBE_PROMPT: &str = "User:<image>Describe this image.\nAssistant:";

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face IDEFICS directory (default: the small model bundled with the repository).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt text; put `<image>` where each image goes (default: describe the image).
    #[arg(long)]
    prompt: Option<String>,
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
    let dir = args.model.clone().unwrap_or_else(bundled_model_dir);
    with_backend(&args.run.clone(), &dir.clone(), Generate { args, dir })
}

struct Generate {
    args: GenerateArgs,
    dir: PathBuf,
}

impl BackendCommand for Generate {
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        run_on(self.args, self.dir, backend)
    }
}

fn run_on<B: Backend>(args: GenerateArgs, dir: PathBuf, backend: B) -> Result<()> {
    let (prompt, images) = match (&args.prompt, args.images.is_empty()) {
        (Some(p), _) => (p.clone(), args.images.clone()),
        (None, false) => {
            let markers = "<image>".repeat(args.images.len());
            (
                format!("User:{markers}Describe this image.\nAssistant:"),
                args.images.clone(),
            )
        }
        (None, true) => (DESCRIBE_PROMPT.to_string(), vec![bundled_example_image()?]),
    };
    let mut pipeline = Pipeline::load(&dir, backend, !args.json)?;
    pipeline.max_image_pixels = args.max_image_pixels;
    let (encoded, pixels) = pipeline.prepare(&prompt, &images)?;
    let request = GenerationRequest {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        stop: args.stop.clone(),
        ignore_eos: false,
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

fn bundled_example_image() -> Result<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/examples/cat.png");
    if !path.exists() {
        return Err(Error::io(
            &path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "bundled example image missing",
            ),
        ));
    }
    Ok(path)
}
