//! `flamingo serve`: the OpenAI-compatible HTTP server over the continuous-batching engine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;
use crate::cli::options::{
    bundled_model_dir, with_backend, BackendCommand, OpenFlamingoPartsArgs, EngineOptions, RunOptions,
};
use crate::error::{Error, Result};
use crate::io::image::{decode_bytes, DecodeBudget};
use crate::runtime::pipeline::{ModelPaths, Pipeline};
use crate::runtime::service::EngineService;
use crate::server::connections::{default_max_connections, ConnectionLimits};
use crate::server::images::{canonical_root, ImagePolicy};
use crate::server::openai::ChatTemplate;
use crate::server::{check_cors_origins, serve, Access, AppState, ServerLimits};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A Hugging Face model directory (IDEFICS, Llama 3.2 Vision) or an OpenFlamingo folder (its checkpoint.pt;
    /// default: the small IDEFICS model bundled with the repository).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    parts: OpenFlamingoPartsArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed on stderr).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model id clients see in /v1/models and responses (default: the model folder's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests waiting for a batch slot beyond --max-seqs before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest max_tokens a request may ask for (also the default when a request does not say).
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// JSON file with a chat template: {"system", "user", "assistant" (each with {content}), "generation_prompt"}.
    /// Default: the IDEFICS instruct format `User:...<end_of_utterance>\nAssistant:`.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Let requests name image files inside this folder.
    #[arg(long)]
    allow_local_images: Option<PathBuf>,
    /// Let requests name http:// image URLs for the server to fetch.
    #[arg(long)]
    allow_remote_images: bool,
    /// Seconds a remote image fetch may take in all (connecting, redirects and the body included); a server that
    /// never answers, or trickles its bytes, fails the request with a 400 when they run out.
    #[arg(long, default_value_t = 30)]
    image_fetch_timeout_secs: u64,
    /// Images per request at most.
    #[arg(long, default_value_t = 8)]
    max_images: usize,
    /// Encoded size of one image at most.
    #[arg(long, default_value_t = 20 << 20)]
    max_image_bytes: usize,
    /// Decoded size of one image at most, in pixels (of every frame of it).
    #[arg(long, default_value_t = crate::io::image::DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
    /// Memory that the image decodes of all requests being prepared may hold at once, MiB (a decode waits for
    /// room). Each image needs up to 7 bytes a pixel.
    #[arg(long, default_value_t = 1024)]
    max_decode_memory_mib: u64,
    /// Request bodies at most (base64 images included); a larger Content-Length gets 413 before any is read.
    #[arg(long, default_value_t = 64 << 20)]
    max_body_bytes: usize,
    /// Open connections at most (default: what the file-descriptor limit leaves room for); more are closed at once.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Seconds a client may take to send a request's headers; an idle keep-alive connection is closed after it.
    #[arg(long, default_value_t = 30)]
    header_timeout_secs: u64,
    /// Seconds a client may take to send a request's body (408 after).
    #[arg(long, default_value_t = 60)]
    body_timeout_secs: u64,
    /// Seconds shutdown (SIGTERM, Ctrl-C) waits for the requests in flight before dropping them.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// Requests to /v1/*, /tokenize and /detokenize must send `Authorization: Bearer KEY` (401 otherwise).
    #[arg(long, env = "FLAMINGO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// An origin browsers may call the API from (repeat for more; `*` for any): answers CORS preflights and
    /// adds Access-Control-Allow-Origin.
    #[arg(long = "cors-allow-origin")]
    cors_allow_origin: Vec<String>,
    #[command(flatten)]
    engine: EngineOptions,
    #[command(flatten)]
    run: RunOptions,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let paths = args.parts.paths(&args.model.clone().map_or_else(bundled_model_dir, Ok)?);
    with_backend(&args.run.clone(), &paths.clone(), Serve { args, paths })
}

struct Serve {
    args: ServeArgs,
    paths: ModelPaths,
}

impl BackendCommand for Serve {
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        run_on(self.args, self.paths, backend)
    }
}

fn run_on<B: Backend + 'static>(args: ServeArgs, paths: ModelPaths, backend: B) -> Result<()> {
    let pipeline = Arc::new(Pipeline::load_paths(&paths, backend, true)?);
    let config = args.engine.config(&pipeline)?;
    let template = args
        .chat_template
        .as_deref()
        .map(ChatTemplate::from_file)
        .transpose()?;
    let decode_budget = decode_budget(args.max_decode_memory_mib, args.max_image_pixels)?;
    let images = ImagePolicy {
        local_root: args
            .allow_local_images
            .as_deref()
            .map(canonical_root)
            .transpose()?,
        allow_remote: args.allow_remote_images,
        fetch_timeout: std::time::Duration::from_secs(args.image_fetch_timeout_secs.clamp(1, 3600)),
        max_bytes: args.max_image_bytes,
        max_pixels: args.max_image_pixels,
        max_images: args.max_images,
        decode_budget: Arc::new(decode_budget),
    };
    let limits = ServerLimits {
        max_in_flight: config.max_seqs + args.max_queue,
        max_tokens: args.max_tokens,
        max_body_bytes: args.max_body_bytes,
    };
    let model_name = args.served_model_name.clone().unwrap_or_else(|| {
        let name = paths.dir.canonicalize().unwrap_or(paths.dir.clone());
        name.file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    check_cors_origins(&args.cors_allow_origin).map_err(Error::Invalid)?;
    if args.api_key.as_deref() == Some("") {
        return Err(Error::Invalid("--api-key: the key is empty".into()));
    }
    let access = Access {
        api_key: args.api_key.clone(),
        cors_origins: args.cors_allow_origin.clone(),
    };
    let service = EngineService::start(pipeline, config)?;
    let state = Arc::new(AppState::new(
        service, model_name, template, images, limits, access,
    ));
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| Error::Invalid(format!("cannot start the async runtime: {e}")))?;
    let address = format!("{}:{}", args.host, args.port);
    let secs = |s: u64| Duration::from_secs(s.clamp(1, 86_400));
    let connections = ConnectionLimits {
        max_connections: args
            .max_connections
            .unwrap_or_else(default_max_connections)
            .max(1),
        header_timeout: secs(args.header_timeout_secs),
        body_timeout: secs(args.body_timeout_secs),
        max_body_bytes: args.max_body_bytes,
        shutdown_grace: secs(args.shutdown_grace_secs),
    };
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .map_err(|e| Error::io(&address, e))?;
        let bound = listener.local_addr().map_err(|e| Error::io(&address, e))?;
        eprintln!("flamingo: listening on http://{bound}");
        serve(listener, state.clone(), connections, shutdown_signal())
            .await
            .map_err(|e| Error::io(&address, e))
    })?;
    eprintln!("flamingo: shutting down, finishing accepted requests");
    drop(runtime);
    drop(state);
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
}

/// The decode memory budget, which must hold at least one image of the largest size allowed.
fn decode_budget(mib: u64, max_pixels: u64) -> Result<DecodeBudget> {
    let one = decode_bytes(max_pixels);
    let bytes = mib.checked_mul(1 << 20).filter(|&b| b >= one).ok_or_else(|| {
        Error::Invalid(format!(
            "--max-decode-memory-mib {mib} must hold one image of --max-image-pixels {max_pixels}: at least {} MiB",
            one.div_ceil(1 << 20)
        ))
    })?;
    Ok(DecodeBudget::new(bytes))
}
