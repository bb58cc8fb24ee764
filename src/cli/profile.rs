//! `flamingo profile`: one prefill (1 image + the prompt) and N decode steps with every op timed (`perf::profile`),
//! a per-op table for each phase, and with `--trace FILE` a Chrome trace of every op.

use std::io::Write;
use std::path::PathBuf;

use crate::backend::{Backend, Ceilings};
use crate::cli::options::{with_backend, BackendCommand, ModelArgs, RunOptions};
use crate::error::{Error, Result};
use crate::perf::profile::{profile_steps, OpRow, Profiled, Workload};

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text tokens per prompt (each prompt also has one image).
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Decode steps profiled after the prefill.
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// Requests prefilled and decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Measured passes of the workload (after one warm-up pass); each op's row and each phase's wall time is its
    /// fastest pass, so a noisy machine's slow moments do not make the table.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Write a Chrome trace (JSON; open in Perfetto or chrome://tracing) of every op here.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Print one JSON object {"ceilings", "phases": {name: {"wall_us", "ops": [...]}}} instead of tables.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: RunOptions,
}

const PHASES: [&str; 2] = ["prefill", "decode"];

pub fn run(args: ProfileArgs) -> Result<()> {
    if args.batch == 0 {
        return Err(Error::Invalid("--batch must be positive".into()));
    }
    if args.repeats == 0 {
        return Err(Error::Invalid("--repeats must be positive".into()));
    }
    with_backend(&args.run.clone(), &args.model.paths(), args)
}

impl BackendCommand for ProfileArgs {
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        profile(&self, backend)
    }
}

fn profile<B: Backend>(args: &ProfileArgs, backend: B) -> Result<()> {
    let p = args.model.load(Profiled::new(backend))?;
    let workload = Workload {
        prompt_tokens: args.prompt_tokens,
        batch: args.batch,
        decode_steps: args.decode_steps,
    };
    profile_steps(&p, &workload, args.repeats)?;
    let b = &p.backend;
    let ceilings = b.measure_ceilings();
    if let Some(path) = &args.trace {
        let text = serde_json::to_string(&b.chrome_trace()).expect("the trace serialises");
        std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
    }
    let text = match args.json {
        true => json(b, &ceilings).to_string(),
        false => tables(args, b, &ceilings),
    };
    writeln!(std::io::stdout().lock(), "{text}").map_err(|e| Error::io("<stdout>", e))
}

fn json<B: Backend>(b: &Profiled<B>, ceilings: &Ceilings) -> serde_json::Value {
    let phases: serde_json::Map<String, serde_json::Value> = PHASES
        .iter()
        .map(|&phase| {
            let value = serde_json::json!({
                "wall_us": b.phase_us(phase),
                "ops": b.table(phase, ceilings),
            });
            (phase.to_string(), value)
        })
        .collect();
    serde_json::json!({
        "device": b.device_name(),
        "ceilings": {
            "copy_gb_per_s": ceilings.copy_bytes_per_s / 1e9,
            "matmul_gflop_per_s": ceilings.matmul_flops_per_s / 1e9,
            "method": ceilings.method,
        },
        "phases": phases,
    })
}

fn tables<B: Backend>(args: &ProfileArgs, b: &Profiled<B>, ceilings: &Ceilings) -> String {
    let mut s = format!(
        "{} on {}: batch {}, 1 image + {} text tokens, {} decode steps, fastest of {} pass(es) after a warm-up\n\
         ceilings: copy {:.1} GB/s, matmul {:.1} GFLOP/s ({})\n",
        args.model.name(),
        b.device_name(),
        args.batch,
        args.prompt_tokens,
        args.decode_steps,
        args.repeats,
        ceilings.copy_bytes_per_s / 1e9,
        ceilings.matmul_flops_per_s / 1e9,
        ceilings.method,
    );
    for phase in PHASES {
        let rows = b.table(phase, ceilings);
        let wall_ms = b.phase_us(phase) / 1e3;
        s += &format!(
            "\n{phase}: {wall_ms:.2} ms wall\n{:<28} {:>6} {:>10} {:>10} {:>7} {:>9} {:>10} {:>6} {:>6}\n",
            "op", "calls", "total ms", "mean us", "% step", "GB/s", "GFLOP/s", "% BW", "% MM"
        );
        for r in &rows {
            s += &row(r);
        }
        let in_ops: f64 = rows.iter().map(|r| r.total_us).sum::<f64>() / 1e3;
        s += &format!(
            "{:<28} {:>6} {:>10.3} {:>10} {:>6.1}%\n",
            "(between ops)",
            "",
            wall_ms - in_ops,
            "",
            100.0 * (1.0 - in_ops / wall_ms)
        );
    }
    s
}

fn row(r: &OpRow) -> String {
    let rate = |v: f64, total: f64| match total > 0.0 {
        true => format!("{v:.1}"),
        false => "-".into(),
    };
    format!(
        "{:<28} {:>6} {:>10.3} {:>10.1} {:>6.1}% {:>9} {:>10} {:>6} {:>6}\n",
        r.op,
        r.calls,
        r.total_us / 1e3,
        r.total_us / r.calls as f64,
        100.0 * r.share_of_phase,
        rate(r.gb_per_s, r.bytes),
        rate(r.gflop_per_s, r.flops),
        rate(100.0 * r.share_of_bandwidth, r.bytes),
        rate(100.0 * r.share_of_matmul, r.flops),
    )
}
