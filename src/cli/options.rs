//! What several commands share: run and engine options, the model argument, the bundled demo model, and running a
//! command on the backend the user chose.

use std::path::{Path, PathBuf};

pub use crate::cli::bundled::bundled_model_dir;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{self, CudaBackend};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::safetensors::WeightStore;
use crate::model::idefics::synthetic::{Preset, PRESET_NAMES};
use crate::runtime::engine::EngineConfig;
use crate::runtime::pipeline::{ModelFiles, ModelPaths, Pipeline};

/// Options every command that runs a model takes.
#[derive(clap::Args, Clone, Debug)]
pub struct RunOptions {
    /// Where to run: auto (CUDA device 0 when there is one, else the CPU), cpu, or cuda[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The CUDA backend's activation, weight and KV-cache type: bf16 (f32's range) or f16 (three more mantissa
    /// bits: closer to a float32 reference where every value stays below 65504, e.g. OpenFlamingo). The CPU backend
    /// computes in f32 and ignores it.
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    pub dtype: cuda::ActDtype,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Load weights without scanning them for NaN and infinity (the scan refuses a corrupt checkpoint, naming the
    /// tensor; it reads every weight once at load).
    #[arg(long)]
    pub skip_weight_check: bool,
}

fn parse_dtype(s: &str) -> std::result::Result<cuda::ActDtype, String> {
    s.parse()
}

/// Limits of the continuous-batching engine (`batch`, `serve`).
#[derive(clap::Args, Clone, Debug)]
pub struct EngineOptions {
    /// Sequences decoded together per step at most (the server's concurrency).
    #[arg(long, alias = "max-concurrent", default_value_t = 64)]
    pub max_seqs: usize,
    /// Rows (prompt chunks and decode tokens) per step at most.
    #[arg(long, default_value_t = 2048)]
    pub max_step_tokens: usize,
    /// Positions per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV-cache blocks in the pool (default: what --kv-memory-mib allows, at most max-seqs full contexts).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Memory for the KV pool when --kv-blocks is not given (default: --kv-memory-fraction of what is free once the
    /// weights are loaded).
    #[arg(long)]
    pub kv_memory_mib: Option<usize>,
    /// Share of the free device (or host) memory the KV pool may take when neither --kv-blocks nor --kv-memory-mib
    /// is given.
    #[arg(long, default_value_t = 0.5)]
    pub kv_memory_fraction: f64,
    /// Images whose cross-attention K/V are cached at once (default: 4 per sequence).
    #[arg(long)]
    pub media_slots: Option<usize>,
    /// Launch every decode step's kernels one by one instead of replaying recorded steps (CUDA graphs).
    #[arg(long)]
    pub no_cuda_graphs: bool,
    /// Compute every prompt and image anew: no prefix caching (full prompt blocks reused across requests by the
    /// content of their tokens and images) and no media cache by content (an image encoded once while cached).
    #[arg(long)]
    pub no_prefix_cache: bool,
}

impl EngineOptions {
    /// Engine limits from the flags, the KV pool sized from its memory budget (K and V of every layer, in the
    /// backend's activation width), never more than `max_seqs` full contexts.
    pub fn config<B: Backend>(&self, p: &Pipeline<B>) -> Result<EngineConfig> {
        self.check_ranges()?;
        let (layers, width) = p.model().kv_layout();
        let block_bytes = 2 * layers * self.block_size * width * p.backend.activation_width();
        let kv_bytes = match self.kv_memory_mib {
            Some(mib) => mib.checked_mul(1 << 20).ok_or_else(|| {
                Error::Invalid(format!("--kv-memory-mib {mib} is beyond any memory"))
            })?,
            None => {
                if !(self.kv_memory_fraction > 0.0 && self.kv_memory_fraction <= 1.0) {
                    return Err(Error::Invalid(format!(
                        "--kv-memory-fraction must be in (0, 1], got {}",
                        self.kv_memory_fraction
                    )));
                }
                (p.backend.free_memory()? as f64 * self.kv_memory_fraction) as usize
            }
        };
        let mut config = EngineConfig::sized(
            self.max_seqs,
            p.model().context_len(),
            self.block_size,
            block_bytes,
            kv_bytes,
        );
        config.max_step_tokens = self.max_step_tokens;
        if let Some(n) = self.kv_blocks {
            config.kv_blocks = n;
        }
        if let Some(n) = self.media_slots {
            config.media_slots = n;
        }
        config.decode_graphs = !self.no_cuda_graphs;
        config.prefix_cache = !self.no_prefix_cache;
        let (blocks, tokens, width) = p.model().media_layout();
        let slot_bytes = 2 * blocks * tokens * width * p.backend.activation_width();
        check_caches_fit(p, &config, block_bytes, slot_bytes)?;
        Ok(config)
    }

    /// Every limit within what an engine can run, so a bad flag is an error naming it, never a panic, an overflow
    /// or a pool that refuses every request.
    fn check_ranges(&self) -> Result<()> {
        let ranges = [
            ("--max-seqs", self.max_seqs, MAX_SEQS),
            ("--max-step-tokens", self.max_step_tokens, MAX_STEP_TOKENS),
            ("--block-size", self.block_size, MAX_BLOCK_SIZE),
            ("--kv-blocks", self.kv_blocks.unwrap_or(1), MAX_KV_BLOCKS),
            (
                "--media-slots",
                self.media_slots.unwrap_or(1),
                MAX_MEDIA_SLOTS,
            ),
        ];
        for (flag, value, max) in ranges {
            if !(1..=max).contains(&value) {
                return Err(Error::Invalid(format!(
                    "{flag} {value} is out of range: it must be 1 to {max}"
                )));
            }
        }
        Ok(())
    }
}

/// Engine limits no flag may pass: far beyond what one device serves, low enough that no size computed from them
/// overflows.
const MAX_SEQS: usize = 65_536;
const MAX_STEP_TOKENS: usize = 1 << 20;
const MAX_BLOCK_SIZE: usize = 4096;
const MAX_KV_BLOCKS: usize = 1 << 28;
const MAX_MEDIA_SLOTS: usize = 1 << 20;

/// The KV pool and the media cache must fit in the memory free once the weights are loaded.
fn check_caches_fit<B: Backend>(
    p: &Pipeline<B>,
    config: &EngineConfig,
    block_bytes: usize,
    slot_bytes: usize,
) -> Result<()> {
    let kv = config.kv_blocks.saturating_mul(block_bytes);
    let media = config.media_slots.saturating_mul(slot_bytes);
    let free = p.backend.free_memory()?;
    if kv.saturating_add(media) > free {
        return Err(Error::Invalid(format!(
            "a KV pool of {} blocks ({} MiB) and a media cache of {} images ({} MiB) need more than the {} MiB \
             free on {} (lower --kv-blocks, --kv-memory-mib or --media-slots)",
            config.kv_blocks,
            kv >> 20,
            config.media_slots,
            media >> 20,
            free >> 20,
            p.backend.device_name()
        )));
    }
    Ok(())
}

/// A command's work on whichever backend `--device` selects: the command code is written once, generic over the
/// backend, and [`with_backend`] instantiates it for the CPU or the CUDA backend.
pub trait BackendCommand {
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()>;
}

/// What a `--device` value names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        let bad = || Error::Device(s.to_string(), "expected auto, cpu, cuda or cuda:N".into());
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Device::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

/// Runs `cmd` on the backend `opts.device` names; the model's weights size the CUDA weight arena (one
/// allocation). `auto` takes CUDA device 0 when there is one, else the CPU; either way stderr says which device.
pub fn with_backend(opts: &RunOptions, model: &ModelPaths, cmd: impl BackendCommand) -> Result<()> {
    if opts.skip_weight_check {
        crate::model::layers::skip_weight_check();
    }
    if let Some(n) = opts.threads {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let max = 8 * cores;
        if !(1..=max).contains(&n) {
            return Err(Error::Invalid(format!(
                "--threads {n} is out of range: this machine has {cores} cores, and at most {max} threads help"
            )));
        }
        // Fails only if the global pool already exists, in which case it keeps its size.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    let device = match opts.device.parse()? {
        Device::Auto if cuda::device_count() > 0 => {
            let b = CudaBackend::with_activations(0, opts.dtype)?;
            eprintln!("note: --device auto: {}", b.summary());
            return run_cuda(b, model, cmd);
        }
        Device::Auto => {
            eprintln!("note: --device auto: no CUDA device, running on the CPU");
            Device::Cpu
        }
        d => d,
    };
    match device {
        Device::Cuda(n) => {
            // Which device, as the driver names it: a simulated one (tools/cudasim) says so here.
            let b = CudaBackend::with_activations(n, opts.dtype)?;
            eprintln!("note: --device cuda:{n}: {}", b.summary());
            run_cuda(b, model, cmd)
        }
        _ => {
            if opts.dtype != cuda::ActDtype::default() {
                eprintln!("note: --dtype {} applies to the CUDA backend; the CPU computes in f32", opts.dtype);
            }
            cmd.run(CpuBackend::new())
        }
    }
}

fn run_cuda(backend: CudaBackend, model: &ModelPaths, cmd: impl BackendCommand) -> Result<()> {
    // A model that does not open is reported by the command itself, with its own message.
    if let Ok(store) = model.open_weights() {
        backend.reserve_weights(device_weight_bytes(&store));
    }
    cmd.run(backend)
}

/// Bytes of every tensor of `store` in a 16-bit type (what the CUDA backend stores), each rounded up to the weight
/// arena's 256-byte alignment.
pub fn device_weight_bytes(store: &WeightStore) -> usize {
    store
        .summary()
        .iter()
        .map(|(_, shape, _)| (shape.iter().product::<usize>() * 2).next_multiple_of(256))
        .sum()
}

/// Which model a measuring command runs.
/// What `--synthetic` names: an IDEFICS preset or Llama 3.2 11B Vision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyntheticModel {
    Idefics(Preset),
    Mllama11b,
}

impl std::str::FromStr for SyntheticModel {
    type Err = Error;
    fn from_str(s: &str) -> Result<SyntheticModel> {
        match s {
            "mllama-11b" => Ok(SyntheticModel::Mllama11b),
            _ => s.parse().map(SyntheticModel::Idefics).map_err(|_| {
                Error::Invalid(format!(
                    "unknown synthetic model `{s}` (expected one of {PRESET_NAMES}, mllama-11b)"
                ))
            }),
        }
    }
}

impl SyntheticModel {
    pub fn name(self) -> &'static str {
        match self {
            SyntheticModel::Idefics(p) => p.name(),
            SyntheticModel::Mllama11b => "mllama-11b",
        }
    }

    /// How the model is named in messages and reports.
    pub fn description(self) -> String {
        match self {
            SyntheticModel::Idefics(p) => p.description(),
            SyntheticModel::Mllama11b => "<synthetic mllama-11b>".into(),
        }
    }
}

/// Where an OpenFlamingo folder's other parts are, when they are not its only subfolders of their kind.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct OpenFlamingoPartsArgs {
    /// OpenFlamingo: the language model's Hugging Face directory (default: the one subfolder of --model with a
    /// config.json).
    #[arg(long)]
    pub lang_model: Option<PathBuf>,
    /// OpenFlamingo: open_clip's open_clip_pytorch_model.bin, or the folder holding it beside its model config
    /// (default: the one subfolder of --model that holds it).
    #[arg(long)]
    pub vision_model: Option<PathBuf>,
}

impl OpenFlamingoPartsArgs {
    /// The model at `dir` with these parts.
    pub fn paths(&self, dir: &Path) -> ModelPaths {
        ModelPaths {
            dir: dir.to_path_buf(),
            lang_model: self.lang_model.clone(),
            vision_model: self.vision_model.clone(),
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// A Hugging Face model directory (IDEFICS, Llama 3.2 Vision) or an OpenFlamingo folder (default: the small
    /// model bundled with the repository).
    #[arg(long, conflicts_with = "synthetic")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub parts: OpenFlamingoPartsArgs,
    /// Random weights at a real configuration, no download: tiny, cpu-mid, idefics-9b, idefics-80b or mllama-11b.
    #[arg(long)]
    pub synthetic: Option<SyntheticModel>,
}

impl ModelArgs {
    /// The model's name in reports.
    pub fn name(&self) -> String {
        match (&self.synthetic, &self.model) {
            (Some(preset), _) => format!("synthetic {}", preset.name()),
            (None, Some(dir)) => dir.display().to_string(),
            (None, None) => "bundled demo model".into(),
        }
    }

    /// The model whose weights size the CUDA weight arena (a synthetic model has none: its weights are
    /// allocated one by one).
    pub fn paths(&self) -> ModelPaths {
        match &self.synthetic {
            Some(preset) => ModelPaths::dir(Path::new(&preset.description())),
            None => self.parts.paths(&self.model.clone().map_or_else(|| bundled_model_dir().unwrap_or_default(), |d| d)),
        }
    }

    /// Loads the model onto `backend` (synthetic ones with the bundled tokenizer).
    pub fn load<B: Backend>(&self, backend: B) -> Result<Pipeline<B>> {
        let files = match (&self.synthetic, &self.model) {
            (Some(SyntheticModel::Idefics(preset)), _) => {
                ModelFiles::synthetic(*preset, &bundled_model_dir()?.join("tokenizer.json"))?
            }
            (Some(SyntheticModel::Mllama11b), _) => ModelFiles::synthetic_mllama_11b()?,
            (None, dir) => ModelFiles::open_paths(&self.parts.paths(&dir.clone().map_or_else(bundled_model_dir, Ok)?))?,
        };
        Pipeline::from_files(files, backend, false)
    }
}
