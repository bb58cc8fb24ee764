#!/usr/bin/env bash
# `flamingo score` against transformers scoring the same candidates as OpenFlamingo's evaluation does (one forward
# per candidate, batch 1), side by side on this machine with the same threads: the bundled demo model on its 64
# held-out pictures, each with its right answer and 4 wrong ones (320 candidates). Prints a table (time,
# candidates/s, ratio, right-first count, largest score difference) and records it in bench/results/.
#   bash scripts/score-vs-torch.sh [--threads N] [--block-size N]
# Needs .venv-bench/ with torch and transformers (bash scripts/cpu-vs-torch.sh --install makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=$(nproc) block=16
while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --block-size) block=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
venv=.venv-bench
if ! "$venv/bin/python" -c 'import torch, transformers' 2>/dev/null; then
  echo "no torch + transformers in $venv: run bash scripts/cpu-vs-torch.sh --install" >&2
  exit 1
fi
cargo build --release --bin flamingo
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/in.jsonl" <<'PY'
import json, sys
from pathlib import Path
d = Path("tests/fixtures/demo-heldout")
items = json.loads((d / "expected.json").read_text())["items"]
answers = sorted({i["answer"] for i in items})
with open(sys.argv[1], "w") as f:
    for n, it in enumerate(items):
        same = sorted({j["answer"] for j in items if j["kind"] == it["kind"]} - {it["answer"]})
        wrong = same + [a for a in answers if a != it["answer"] and a not in same]
        k = n % len(wrong)
        wrong = (wrong[k:] + wrong[:k])[:4]
        f.write(json.dumps({"images": [str((d / it["image"]).resolve())], "prompt": it["prompt"],
                            "candidates": [" " + it["answer"]] + [" " + w for w in wrong]}) + "\n")
PY
# Best of 3 runs for the engine (its whole command: load, score, write), one for transformers (minutes).
best=""
for _ in 1 2 3; do
  t0=$(date +%s.%N)
  ./target/release/flamingo score --device cpu --threads "$threads" --block-size "$block" \
    --input "$work/in.jsonl" --output "$work/ours.jsonl" 2>"$work/ours.log"
  t=$(python3 -c "import time; print(time.time() - $t0)")
  best=$(python3 -c "print(min(float('${best:-1e9}'), $t))")
done
theirs=$(OMP_NUM_THREADS=$threads "$venv/bin/python" scripts/torch_score_bench.py --model assets/demo-model \
         --input "$work/in.jsonl" --threads "$threads")
table=$(python3 - "$work/ours.jsonl" "$best" "$theirs" "$(tail -1 "$work/ours.log")" <<'PY'
import json, sys
ours = [json.loads(l) for l in open(sys.argv[1])]
seconds, theirs, log = float(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
n = sum(len(o["scores"]) for o in ours)
top1 = sum(o["ranking"][0] == 0 for o in ours)
diff = max(abs(s["logprob"] - t) for o, row in zip(ours, theirs["scores"]) for s, t in zip(o["scores"], row))
print(f"{theirs['lines']} lines, {n} candidates; {theirs['threads']} threads; torch {theirs['torch']}, "
      f"transformers {theirs['transformers']} (eager, f32, one forward per candidate)")
print()
print("| figure | flamingo score | transformers | transformers / flamingo |")
print("|---|---:|---:|---:|")
print(f"| wall time (s) | {seconds:.2f} | {theirs['seconds']:.2f} | {theirs['seconds'] / seconds:.1f}x |")
print(f"| candidates / s | {n / seconds:.0f} | {theirs['candidates_per_s']:.1f} | |")
print(f"| right answer first | {top1} / {len(ours)} | {theirs['top1']} / {theirs['lines']} | |")
print()
print(f"Largest |logprob difference| over all candidates: {diff:.2e}.")
print(f"flamingo's time is its whole command (model load included), best of 3; its summary: `{log}`")
PY
)
echo "$table"
echo "$table" | bash scripts/record-result.sh score-vs-transformers-cpu \
  "flamingo score against transformers scoring as OpenFlamingo's evaluation does (demo model, 64 held-out pictures)" \
  "bash scripts/score-vs-torch.sh --threads $threads --block-size $block"
