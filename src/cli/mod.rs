//! The `flamingo` command line: `generate`, `batch`, `score`, `serve`, `bench`, `profile`, `inspect`, `convert` and
//! `doctor`.

mod batch;
mod bench;
mod bundled;
mod convert;
mod doctor;
mod generate;
mod inspect;
pub mod options;
mod jsonl;
mod profile;
mod score;
mod serve;

use clap::{Parser, Subcommand};

use crate::error::Result;

#[derive(Parser)]
#[command(
    name = "flamingo",
    version,
    about = "Inference engine for Flamingo-style vision-language models (IDEFICS, Llama 3.2 Vision, OpenFlamingo)"
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
    /// Rank candidate texts by their log-probability given images and a prompt (JSON lines in and out).
    Score(score::ScoreArgs),
    /// Serve the OpenAI-compatible HTTP API (chat completions with images, completions, streaming, metrics).
    Serve(serve::ServeArgs),
    /// Measure latency and throughput end to end, each beside its roofline floor.
    Bench(bench::BenchArgs),
    /// Time every op of a prefill and decode steps; print a per-op table and write a Chrome trace.
    Profile(profile::ProfileArgs),
    /// Print a model directory's architecture, parameter counts, dtypes and special tokens.
    Inspect(inspect::InspectArgs),
    /// Write an OpenFlamingo model as released (checkpoint.pt, its language model, open_clip's tower) as one
    /// safetensors folder.
    Convert(convert::ConvertArgs),
    /// Check the CUDA setup: driver, devices, NVRTC, prebuilt kernels; compile every kernel with NVRTC.
    Doctor(doctor::DoctorArgs),
}

/// Runs the command line; the caller turns an error into a message and a non-zero exit.
pub fn run() -> Result<()> {
    let command = Cli::parse().command;
    if !matches!(command, Command::Serve(_)) {
        exit_quietly_on_closed_pipe();
    }
    match command {
        Command::Generate(args) => generate::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Score(args) => score::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Profile(args) => profile::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Doctor(args) => doctor::run(args),
    }
}

/// `flamingo inspect | head` closes stdout early: end as Unix tools do (SIGPIPE) instead of panicking in
/// `println!` (Rust ignores SIGPIPE). Not for `serve`, whose sockets must never end the process.
fn exit_quietly_on_closed_pipe() {
    // SAFETY: sets a signal's disposition to its default, before the command starts any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
