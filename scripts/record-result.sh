#!/usr/bin/env bash
# Records a result table (read from stdin) in bench/results/DATE-COMMIT-KIND.md, under a heading with the date, the
# commit, the machine and the command that produced it; prints the file's path.
#   echo "$table" | bash scripts/record-result.sh KIND "TITLE" "COMMAND"
set -euo pipefail
cd "$(dirname "$0")/.."
kind=$1 title=$2 command=$3
commit=$(git rev-parse --short HEAD)
out="bench/results/$(date -u +%Y-%m-%d)-$commit-$kind.md"
mkdir -p bench/results
{
  echo "# $title, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit"
  echo
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -m)."
  echo "Command: $command"
  echo
  cat
} >"$out"
echo "$out"
