//! What a profile says: the per-op table of a phase (calls, time, share of the phase's wall time, achieved
//! bandwidth and FLOP rate against the measured ceilings) and a Chrome trace (opens in Perfetto or
//! chrome://tracing). Where the workload was measured more than once (`flamingo profile --repeats`), a phase's
//! wall time is its fastest pass's, and each op's row is the op's fastest pass (the passes run the same calls).

use std::collections::BTreeMap;

use serde_json::json;

use crate::backend::Ceilings;

/// One op as it ran.
#[derive(Clone, Debug)]
pub struct Record {
    /// The op, with its detail where calls differ (`linear 4096x11008`): one row of the table each.
    pub op: String,
    pub phase: String,
    /// Which measured pass of the workload it ran in.
    pub pass: usize,
    /// Microseconds since the profiler started: the span's start on the host clock plus the op's start after it
    /// on the device's clock.
    pub start_us: f64,
    pub duration_us: f64,
    pub flops: f64,
    pub bytes: f64,
}

/// A phase as it ran: a stretch of wall time whose ops share a label.
#[derive(Clone, Debug)]
pub struct Span {
    pub name: String,
    pub pass: usize,
    pub start_us: f64,
    pub end_us: f64,
}

/// One line of the per-op table.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct OpRow {
    pub op: String,
    pub calls: usize,
    pub total_us: f64,
    pub flops: f64,
    pub bytes: f64,
    pub share_of_phase: f64,
    pub gb_per_s: f64,
    pub gflop_per_s: f64,
    pub share_of_bandwidth: f64,
    pub share_of_matmul: f64,
}

/// Wall time of a phase, microseconds: all its spans in a pass, the fastest pass.
pub fn phase_us(spans: &[Span], phase: &str) -> f64 {
    let mut by_pass: BTreeMap<usize, f64> = BTreeMap::new();
    for s in spans.iter().filter(|s| s.name == phase) {
        *by_pass.entry(s.pass).or_default() += s.end_us - s.start_us;
    }
    by_pass.into_values().reduce(f64::min).unwrap_or(0.0)
}

/// Per-op table of one phase, ops in order of total time.
pub fn table(records: &[Record], spans: &[Span], phase: &str, ceilings: &Ceilings) -> Vec<OpRow> {
    let wall_us = phase_us(spans, phase);
    let mut by_pass_and_op: BTreeMap<(usize, String), OpRow> = BTreeMap::new();
    for r in records.iter().filter(|r| r.phase == phase) {
        let row = by_pass_and_op.entry((r.pass, r.op.clone())).or_insert_with(|| OpRow {
            op: r.op.clone(),
            ..OpRow::default()
        });
        row.calls += 1;
        row.total_us += r.duration_us;
        row.flops += r.flops;
        row.bytes += r.bytes;
    }
    let mut fastest: BTreeMap<String, OpRow> = BTreeMap::new();
    for row in by_pass_and_op.into_values() {
        match fastest.get(&row.op) {
            Some(best) if best.total_us <= row.total_us => {}
            _ => {
                fastest.insert(row.op.clone(), row);
            }
        }
    }
    let mut rows: Vec<OpRow> = fastest.into_values().collect();
    for row in &mut rows {
        let seconds = row.total_us * 1e-6;
        row.share_of_phase = row.total_us / wall_us;
        row.gb_per_s = row.bytes / seconds / 1e9;
        row.gflop_per_s = row.flops / seconds / 1e9;
        row.share_of_bandwidth = row.bytes / seconds / ceilings.copy_bytes_per_s;
        row.share_of_matmul = row.flops / seconds / ceilings.matmul_flops_per_s;
    }
    rows.sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
    rows
}

/// Every phase and op as Chrome trace events (`ph: X`, microseconds): phases on thread 0, ops on thread 1.
pub fn chrome_trace(records: &[Record], spans: &[Span]) -> serde_json::Value {
    let phases = spans.iter().map(|s| {
        json!({"name": s.name, "cat": "phase", "ph": "X", "pid": 1, "tid": 0,
               "ts": s.start_us, "dur": s.end_us - s.start_us})
    });
    let ops = records.iter().map(|r| {
        json!({"name": r.op, "cat": r.phase, "ph": "X", "pid": 1, "tid": 1,
               "ts": r.start_us, "dur": r.duration_us,
               "args": {"gflop": r.flops / 1e9, "mb": r.bytes / 1e6}})
    });
    let names = [(0, "phases"), (1, "ops")].map(|(tid, name)| {
        json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}})
    });
    json!({
        "traceEvents": phases.chain(ops).chain(names).collect::<Vec<_>>(),
        "displayTimeUnit": "ms",
    })
}
