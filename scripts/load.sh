#!/usr/bin/env bash
# Drives `flamingo serve` with N concurrent streaming clients for a bounded time and records requests/s, tokens/s,
# latency and time-to-first-token percentiles, and errors in bench/results/.
#   bash scripts/load.sh [--model DIR] [--concurrency N] [--seconds S] [--max-tokens T] [--device D]
# Default: the bundled model on the CPU, 16 clients for 20 s, 32 new tokens per request.
set -euo pipefail
cd "$(dirname "$0")/.."

model=assets/demo-model concurrency=16 seconds=20 max_tokens=32 device=cpu
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

cargo build --release --bin flamingo --example load
log=$(mktemp)
./target/release/flamingo serve --model "$model" --device "$device" --port 0 --max-tokens "$max_tokens" 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
  url=$(sed -n 's/^flamingo: listening on //p' "$log")
  [[ -n "$url" ]] && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
[[ -n "$url" ]] || { echo "the server did not start" >&2; exit 1; }

image=$(ls assets/examples/*.png | head -n 1)
table=$(./target/release/examples/load --url "$url" --concurrency "$concurrency" --seconds "$seconds" \
        --max-tokens "$max_tokens" --image "$image")
echo "$table"

out=$(echo "$table" | bash scripts/record-result.sh "load-$device" \
      "Load test: flamingo serve ($model on $device)" \
      "bash scripts/load.sh --model $model --concurrency $concurrency --seconds $seconds --max-tokens $max_tokens --device $device")
echo "recorded in $out"
