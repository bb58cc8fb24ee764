#!/usr/bin/env bash
# Runs `flamingo bench` with the given arguments and records its table in bench/results/ (date, commit, machine).
#   bash scripts/bench.sh --synthetic cpu-mid --device cpu --concurrency 1,4 --new-tokens 16
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bin flamingo
table=$(./target/release/flamingo bench "$@")
echo "$table"

commit=$(git rev-parse --short HEAD)
name=$(echo "$*" | tr -c 'a-zA-Z0-9.\n-' '_' | tr -s '_' | sed 's/^_//; s/_$//')
out="bench/results/$(date -u +%Y-%m-%d)-$commit-bench-${name:-default}.md"
mkdir -p bench/results
{
  echo "# flamingo bench, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit"
  echo
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -m)."
  echo "Command: bash scripts/bench.sh $*"
  echo
  echo '```'
  echo "$table"
  echo '```'
} >"$out"
echo "recorded in $out"
