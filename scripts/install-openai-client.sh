#!/usr/bin/env bash
# Installs the official `openai` Python package into the git-ignored .toolchain/openai-venv/, for the tests that
# drive `flamingo serve` as real clients do (tests/openai_client.rs). Prints the venv's python on success.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.toolchain/openai-venv"
PY="$VENV/bin/python"
if ! "$PY" -c 'import openai' >/dev/null 2>&1; then
  rm -rf "$VENV"
  mkdir -p "$ROOT/.toolchain"
  python3 -m venv "$VENV" >"$ROOT/.toolchain/openai-pip.log" 2>&1
  "$PY" -m pip install --quiet --disable-pip-version-check --no-cache-dir 'openai>=1.40,<4' \
    >>"$ROOT/.toolchain/openai-pip.log" 2>&1 || {
      cat "$ROOT/.toolchain/openai-pip.log" >&2
      echo "error: pip install openai failed (log: .toolchain/openai-pip.log)" >&2
      exit 1
    }
fi
echo "$PY"
