//! The `flamingo` command line: `generate`, `batch` and `inspect`.

mod batch;
mod generate;
mod inspect;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::error::{Error, Result};

#[derive(Parser)]
#[command(
    name = "flamingo",
    version,
    about = "Inference engine for Flamingo-style vision-language models (IDEFICS)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt with `<image>` markers and image files.
    Generate(generate::GenerateArgs),
    /// Run a file of requests (JSON lines) through the continuous-batching engine; results in input order.
    Batch(batch::BatchArgs),
    /// Print a model directory's architecture, parameter counts, dtypes and special tokens.
    Inspect(inspect::InspectArgs),
}

/// Options every command that runs a model takes.
#[derive(clap::Args, Clone, Debug)]
pub struct RunOptions {
    /// Where to run: auto (the best available), cpu, or cuda[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// The backend a `--device` value names. Only the CPU backend exists in this build; `auto` resolves to it.
pub fn select_cpu_backend(opts: &RunOptions) -> Result<crate::backend::cpu::CpuBackend> {
    if let Some(n) = opts.threads {
        // Fails only if the global pool already exists, in which case it keeps its size.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global();
    }
    match opts.device.as_str() {
        "auto" | "cpu" => Ok(crate::backend::cpu::CpuBackend::new()),
        d if d == "cuda" || d.starts_with("cuda:") => Err(Error::Device(
            d.to_string(),
            "this build has no CUDA backend yet; use --device cpu".into(),
        )),
        d => Err(Error::Device(
            d.to_string(),
            "expected auto, cpu or cuda[:N]".into(),
        )),
    }
}

/// The small model bundled with the repository, used when `--model` is not given.
pub fn bundled_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo-model")
}

/// Runs the command line; the caller turns an error into a message and a non-zero exit.
pub fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Inspect(args) => inspect::run(args),
    }
}
