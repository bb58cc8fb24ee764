#!/usr/bin/env bash
# Side by side on the H200, in one command of at most 8 minutes: our kernels against PyTorch's on the same shapes
# (cuBLAS GEMMs, SDPA flash attention, transformers' resampler and gated cross-attention modules), and our engine
# against transformers' IdeficsForVisionText2Text (bf16, sdpa) on the synthetic idefics-9b configuration. Prints
# ratio tables (torch time / ours: above 1 means we are faster) and writes every log and a summary.md to $OUT.
#
# NOT YET RUN: no device was lent to the tasks that wrote it. The device has no Rust: scripts/pack-device.sh builds
# the pack here (device-pack/flamingo, ops-bench, root/assets, root/scripts, manifest-dir).
# Usage (device tool): command "bash device-pack/root/scripts/device-bench.sh", carry ["device-pack"], timeout_s 540.
set -uo pipefail
PACK="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$PACK/out}"
mkdir -p "$OUT"
cd "$PACK/root"
# Synthetic models use the bundled tokenizer at the path the build baked in: make that path resolve here.
MANIFEST="$(cat "$PACK/manifest-dir")"
[ -e "$MANIFEST" ] || { mkdir -p "$(dirname "$MANIFEST")" && ln -s "$PACK/root" "$MANIFEST"; }

status=0
# step NAME CAP_SECONDS COMMAND...: runs it with a time cap, its output to $OUT/NAME.log.
step() {
  local name="$1" cap="$2"; shift 2
  echo "== $name (cap ${cap}s)"
  timeout "$cap" "$@" >"$OUT/$name.log" 2>&1 || { echo "   failed ($?): see $name.log"; status=1; }
}

# Caps add up to 465 s.
step torch-ops 75 python3 scripts/torch_ops_bench.py --repeats 20
step ours-ops 120 env FLAMINGO_BENCH_DEVICE=cuda "$PACK/ops-bench" --bench --output-format bencher \
  --warm-up-time 0.2 --measurement-time 1 'idefics-9b'
step torch-e2e 120 python3 scripts/torch_idefics_bench.py --config assets/configs/idefics-9b.json \
  --device cuda --dtype bfloat16 --attn sdpa --prompt-tokens 64 --decode-tokens 32 --repeats 5
step ours-e2e 90 "$PACK/flamingo" bench --synthetic idefics-9b --device cuda --json \
  --concurrency 8,32,128 --new-tokens 128 --decode-tokens 64 --repeats 5
# The same engine launching kernel by kernel: what CUDA graphs save per decode step.
step ours-e2e-eager 60 "$PACK/flamingo" bench --synthetic idefics-9b --device cuda --json --no-cuda-graphs \
  --concurrency 8 --new-tokens 64 --decode-tokens 64 --repeats 3

python3 - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, re, sys
out = sys.argv[1]
def read(name):
    try:
        return open(f"{out}/{name}.log").read()
    except OSError:
        return ""
def last_json(text):
    lines = [l for l in text.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else {}
torch_ops = last_json(read("torch-ops"))
# criterion's bencher format: "test ID ... bench: 12,345 ns/iter (+/- 67)"
ours_ops = {m[1]: int(m[2].replace(",", "")) / 1e6
            for m in re.finditer(r"test (\S+) \.\.\. bench:\s+([\d,]+) ns/iter", read("ours-ops"))}
print("## Kernels, idefics-9b shapes (ms; ratio = torch / ours)\n")
print("| bench | ours | torch | ratio |\n|---|---:|---:|---:|")
for key, t in torch_ops.items():
    ours = ours_ops.get(key)
    cell = f"{ours:.4f} | {t:.4f} | {t / ours:.2f}x" if ours else f"- | {t:.4f} | -"
    print(f"| {key} | {cell} |")
theirs, ours = last_json(read("torch-e2e")), last_json(read("ours-e2e"))
print("\n## End to end, synthetic idefics-9b, bf16 (ms; ratio = transformers / ours)\n")
print("| figure | ours | transformers | ratio | our floor |\n|---|---:|---:|---:|---:|")
for name, ok, tk in [("vision + resampler", "image_encode", "image_ms"),
                     ("prefill 1 image + 64 tokens", "time_to_first_token", "prefill_ms"),
                     ("decode batch 1, per token", "decode_batch1", "decode_ms_per_token")]:
    if ok in ours and tk in theirs:
        o = ours[ok]
        print(f"| {name} | {o['value']:.3f} | {theirs[tk]:.3f} | {theirs[tk] / o['value']:.2f}x | {o['floor']:.3f} |")
for t in ours.get("throughput", []):
    f = t["output_tokens_per_s"]
    print(f"| output tokens/s at {t['concurrency']} requests | {f['value']:.0f} | - | - | {f['floor']:.0f} |")
eager = last_json(read("ours-e2e-eager"))
if "decode_batch1" in eager and "decode_batch1" in ours:
    e, g = eager["decode_batch1"]["value"], ours["decode_batch1"]["value"]
    print(f"\n## CUDA graphs\n\ndecode batch 1: {g:.3f} ms/token with graphs, {e:.3f} without ({e / g:.2f}x)")
EOF
exit $status
