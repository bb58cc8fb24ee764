#!/usr/bin/env bash
# Side by side on the CPU: this engine against transformers' IDEFICS in PyTorch eager, both f32, same thread count,
# on the cpu-mid configuration (assets/configs/cpu-mid.json, 293M parameters, random weights): vision + resampler
# time for one image, prefill of 1 image + 64 tokens, decode ms/token. Prints a table of both and torch/ours ratios
# and records it in bench/results/.
#   bash scripts/cpu-vs-torch.sh [--install] [--threads N] [--decode-tokens N] [--repeats N]
# --install creates the git-ignored .venv-bench/ and installs torch and transformers into it (a large download);
# without it the script only uses a .venv-bench/ that already exists.
set -euo pipefail
cd "$(dirname "$0")/.."

install=0 threads=$(nproc) decode_tokens=16 repeats=3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --install) install=1; shift ;;
    --threads) threads=$2; shift 2 ;;
    --decode-tokens) decode_tokens=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

venv=.venv-bench
if [[ $install == 1 ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers pillow
fi
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import torch, transformers' 2>/dev/null; then
  echo "no torch + transformers in $venv: run with --install (downloads PyTorch)" >&2
  exit 1
fi

cargo build --release --bin flamingo
ours=$(./target/release/flamingo bench --synthetic cpu-mid --device cpu --threads "$threads" --json \
       --prompt-tokens 64 --decode-tokens "$decode_tokens" --repeats "$repeats" --vision-images 2 \
       --concurrency 1 --new-tokens 2)
theirs=$(OMP_NUM_THREADS=$threads "$venv/bin/python" scripts/torch_idefics_bench.py \
         --config assets/configs/cpu-mid.json --device cpu --dtype float32 --attn eager --threads "$threads" \
         --prompt-tokens 64 --decode-tokens "$decode_tokens" --repeats "$repeats")

table=$(python3 - "$ours" "$theirs" <<'EOF'
import json, sys
ours, theirs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rows = [
    ("vision + resampler, 1 image (ms)", ours["image_encode"]["value"], theirs["image_ms"]),
    ("prefill 1 image + 64 tokens (ms)", ours["time_to_first_token"]["value"], theirs["prefill_ms"]),
    ("decode, batch 1 (ms/token)", ours["decode_batch1"]["value"], theirs["decode_ms_per_token"]),
]
print(f"flamingo: {ours['device']}; torch {theirs['torch']}, transformers {theirs['transformers']}, "
      f"{theirs['threads']} threads, eager, f32")
print()
print("| figure | flamingo | transformers | transformers / flamingo |")
print("|---|---:|---:|---:|")
for name, a, b in rows:
    print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
print()
print("flamingo's prefill is its time to first token (vision, resampler, prompt, first token);"
      " transformers' is one forward of the prompt with its image.")
EOF
)
echo "$table"

out=$(echo "$table" | bash scripts/record-result.sh cpu-vs-torch \
      "CPU side by side: flamingo vs transformers IDEFICS (cpu-mid, f32)" \
      "bash scripts/cpu-vs-torch.sh --threads $threads --decode-tokens $decode_tokens --repeats $repeats")
echo "recorded in $out"
