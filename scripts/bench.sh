#!/usr/bin/env bash
# Runs `flamingo bench` with the given arguments and records its table in bench/results/ (date, commit, machine).
#   bash scripts/bench.sh --synthetic cpu-mid --device cpu --concurrency 1,4 --new-tokens 16
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bin flamingo
table=$(./target/release/flamingo bench "$@")
echo "$table"

name=$(echo "$*" | sed 's/--//g' | tr -c 'a-zA-Z0-9.\n-' '_' | tr -s '_' | sed 's/^_//; s/_$//' | cut -c1-60)
out=$(printf '```\n%s\n```\n' "$table" \
      | bash scripts/record-result.sh "bench-${name:-default}" "flamingo bench" "bash scripts/bench.sh $*")
echo "recorded in $out"
