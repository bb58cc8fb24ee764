//! `flamingo bench`: time to first token, decode latency, throughput under concurrency and vision encoder speed,
//! each beside its roofline floor from ceilings measured in the same run, and the few-shot workloads with the
//! prefix and media caches beside without (see `perf::bench`). `--json` prints one
//! object with every figure.

use std::io::Write;

use crate::backend::Backend;
use crate::cli::options::{with_backend, BackendCommand, ModelArgs, RunOptions};
use crate::error::{Error, Result};
use crate::perf::bench::{BenchOptions, BenchReport, Figure};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text tokens per prompt (each prompt also has one image).
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens each request generates in the throughput runs.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Concurrent requests of the throughput runs, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [8, 32, 128])]
    concurrency: Vec<usize>,
    /// Tokens timed for the batch-1 decode figure.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Images timed for the vision encoder figure.
    #[arg(long, default_value_t = 16)]
    vision_images: usize,
    /// Timed repetitions of the latency figures (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Launch every decode step's kernels one by one instead of replaying recorded steps (CUDA graphs).
    #[arg(long)]
    no_cuda_graphs: bool,
    /// Support pictures of the few-shot workloads (k captioned pictures, then a query), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [4, 8])]
    shots: Vec<usize>,
    /// Queries behind each few-shot workload's support set (0: no few-shot figures).
    #[arg(long, default_value_t = 16)]
    few_shot_queries: usize,
    #[command(flatten)]
    run: RunOptions,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.concurrency.contains(&0) || args.new_tokens == 0 || args.shots.contains(&0) {
        return Err(Error::Invalid(
            "--concurrency values, --shots values and --new-tokens must be positive".into(),
        ));
    }
    with_backend(&args.run.clone(), &args.model.paths(), args)
}

impl BackendCommand for BenchArgs {
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        bench(&self, backend)
    }
}

fn bench<B: Backend>(args: &BenchArgs, backend: B) -> Result<()> {
    let pipeline = args.model.load(backend)?;
    let opts = BenchOptions {
        prompt_tokens: args.prompt_tokens,
        new_tokens: args.new_tokens,
        concurrency: args.concurrency.clone(),
        decode_tokens: args.decode_tokens,
        vision_images: args.vision_images,
        repeats: args.repeats,
        decode_graphs: !args.no_cuda_graphs,
        shots: args.shots.clone(),
        few_shot_queries: args.few_shot_queries,
    };
    let report = crate::perf::bench::run(&pipeline, &opts, &args.model.name(), |what| {
        if !args.json {
            eprintln!("bench: {what}");
        }
    })?;
    let mut out = std::io::stdout().lock();
    let text = match args.json {
        true => serde_json::to_string(&report).expect("the report serialises"),
        false => table(&report),
    };
    writeln!(out, "{text}").map_err(|e| Error::io("<stdout>", e))
}

/// The report as a human-readable table.
fn table(r: &BenchReport) -> String {
    let mut s = format!(
        "{} on {}: {:.1}M parameters, {:.3} GB of weights ({:.3} GB read per decode step)\n\
         ceilings: copy {:.1} GB/s, matmul {:.1} GFLOP/s ({})\n\
         prompts: 1 image + {} tokens in all; decode steps {}\n\n\
         {:<34} {:>18} {:>18} {:>9}\n",
        r.model,
        r.device,
        r.params / 1e6,
        r.weight_gb,
        r.decode_weight_gb,
        r.ceilings.copy_gb_per_s,
        r.ceilings.matmul_gflop_per_s,
        r.ceilings.method,
        r.prompt_tokens,
        if r.decode_graphs {
            "replayed from CUDA graphs"
        } else {
            "launched kernel by kernel"
        },
        "figure",
        "measured",
        "floor",
        "of floor",
    );
    let mut row = |name: &str, f: &Figure| {
        s += &format!(
            "{name:<34} {:>18} {:>18} {:>8.1}%\n",
            format!("{:.2} {}", f.value, f.unit),
            format!("{:.2} {}", f.floor, f.unit),
            100.0 * f.fraction
        );
    };
    row("time to first token", &r.time_to_first_token);
    row("decode, batch 1 (per token)", &r.decode_batch1);
    row("image: vision + resampler/projector", &r.image_encode);
    row("vision encoder", &r.vision_images_per_s);
    for t in &r.throughput {
        row(
            &format!(
                "output, {} requests x {} tokens",
                t.concurrency, t.new_tokens
            ),
            &t.output_tokens_per_s,
        );
    }
    if !r.few_shot.is_empty() {
        s += &format!(
            "\n{:<34} {:>18} {:>18} {:>9}\n",
            "few-shot (queries alone / all)", "cached", "uncached", "ratio"
        );
    }
    for f in &r.few_shot {
        let (c, u) = (&f.cached, &f.uncached);
        let name = format!("{}-shot, {} tokens", f.shots, f.prompt_tokens);
        s += &format!(
            "{:<34} {:>18} {:>18} {:>8.2}x\n",
            format!("{name}: time to first token"),
            format!("{:.2} ms", c.time_to_first_token_ms),
            format!("{:.2} ms", u.time_to_first_token_ms),
            f.ttft_speedup
        );
        s += &format!(
            "{:<34} {:>18} {:>18} {:>8.2}x\n",
            format!("{} queries x {} tokens", f.queries, f.new_tokens),
            format!("{:.2} req/s", c.requests_per_s),
            format!("{:.2} req/s", u.requests_per_s),
            f.throughput_speedup
        );
        s += &format!(
            "{:<34} prefix hits {:.1}%, media hits {:.1}%, {} prefill rows saved, {} of {} images encoded\n",
            "  caches",
            100.0 * c.prefix_hit_rate,
            100.0 * c.media_hit_rate,
            c.prefill_rows_saved,
            c.images_encoded,
            u.images_encoded,
        );
    }
    s
}
