#!/usr/bin/env bash
# Builds what the GPU machine runs (it has no Rust and no network) into the git-ignored folder device-pack/:
#   flamingo (release binary, stripped)  gpu-tests (tests/gpu.rs)  cuda-bench (benches/cuda_ops.rs)
#   ops-bench (benches/ops.rs, for device-bench.sh)
#   root/tests/fixtures, root/assets     (the paths the test binary has baked in, see device-check.sh)
#   root/scripts                         (device-bench.sh and its PyTorch scripts)
#   device-check.sh                      (the script to run there)  manifest-dir  (the build's CARGO_MANIFEST_DIR)
# The binaries embed the kernels as sm_90 fatbins when nvcc is available here (scripts/check-kernels.sh installs
# the pinned CUDA 13.0 wheels), so the device needs no compiler. Fails if the pack exceeds 64 MiB.
# Usage: bash scripts/pack-device.sh      then, on the device (carry device-pack): bash device-pack/device-check.sh
#        and, with time left, bash device-pack/root/scripts/device-bench.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PACK="$ROOT/device-pack"

if [ ! -x .toolchain/cuda/nvidia/cu13/bin/nvcc ] && ! command -v nvcc >/dev/null; then
  echo "== no nvcc: installing the CUDA 13.0 wheels (scripts/check-kernels.sh) so the kernels are prebuilt"
  SKIP_NVRTC=1 bash scripts/check-kernels.sh >/dev/null
fi

echo "== building (release): binary, tests/gpu.rs, benches/cuda_ops.rs, benches/ops.rs"
# The last executable cargo reports for a target, from its JSON messages.
executable() { python3 -c '
import json, sys
exe = [m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable")]
print(exe[-1] if exe else "")'; }
cargo build --release --bin flamingo
gpu_tests=$(cargo test --release --test gpu --no-run --message-format=json 2>/dev/null | executable)
bench=$(cargo bench --bench cuda_ops --no-run --message-format=json 2>/dev/null | executable)
ops_bench=$(cargo bench --bench ops --no-run --message-format=json 2>/dev/null | executable)
[ -x "$gpu_tests" ] && [ -x "$bench" ] && [ -x "$ops_bench" ] \
  || { echo "error: could not locate the test or bench executables" >&2; exit 1; }
out_dir=$(ls -td target/release/build/flamingo-engine-*/out | head -1)
grep -q 'NVCC: Option<&str> = Some' "$out_dir/kernels.rs" \
  || echo "warning: built without nvcc: the device will compile the kernels with its own NVRTC" >&2

rm -rf "$PACK"
mkdir -p "$PACK/root/tests"
cp target/release/flamingo "$PACK/flamingo"
cp "$gpu_tests" "$PACK/gpu-tests"
cp "$bench" "$PACK/cuda-bench"
cp "$ops_bench" "$PACK/ops-bench"
strip "$PACK/flamingo" "$PACK/gpu-tests" "$PACK/cuda-bench" "$PACK/ops-bench"
cp -r tests/fixtures "$PACK/root/tests/"
cp -r assets "$PACK/root/"
mkdir -p "$PACK/root/scripts"
cp scripts/device-bench.sh scripts/torch_*.py "$PACK/root/scripts/"
cp "$out_dir"/*.ptxas.txt "$PACK/root/" 2>/dev/null || true
cp scripts/device-check.sh "$PACK/"
echo "$ROOT" > "$PACK/manifest-dir"
git rev-parse --short HEAD > "$PACK/commit"

size=$(du -sm "$PACK" | cut -f1)
echo "== device-pack: ${size} MiB"
ls -la "$PACK"
[ "$size" -lt 64 ] || { echo "error: device-pack is ${size} MiB, over the 64 MiB that can be carried" >&2; exit 1; }
