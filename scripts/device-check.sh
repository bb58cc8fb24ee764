#!/usr/bin/env bash
# The one GPU script, run on the lent H200 with device-pack carried (built here by scripts/pack-device.sh; the
# device has no Rust and no network). Five minutes at most: every step has a time cap and the caps add up to 300 s,
# so a fix and a rerun still fit in a task's 15 minutes of device time.
#   nvidia-smi | compute-sanitizer synccheck on decode attention and recorded steps | flamingo doctor | every GPU
#   test | flamingo generate and profile on cuda (events, cuBLAS ceiling, trace) | memcheck and racecheck on short
#   test runs | brief kernel benches (CUDA events)
# Full logs go to $OUT (9 files at most come back: one log per step plus summary.md); one compact table is
# printed last. Exit status: 0 only if every step passed.
# Usage (device tool): command "bash device-pack/device-check.sh", carry ["device-pack"], timeout_s 360.
set -uo pipefail
PACK="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$PACK/out}"
mkdir -p "$OUT"

# The test binary reads fixtures under the CARGO_MANIFEST_DIR it was built in: make that path resolve here.
MANIFEST="$(cat "$PACK/manifest-dir")"
if [ ! -d "$MANIFEST/tests/fixtures" ]; then
  if [ -e "$MANIFEST" ]; then
    echo "warning: $MANIFEST exists without tests/fixtures; fixture tests will fail" >&2
  else
    mkdir -p "$(dirname "$MANIFEST")" && ln -s "$PACK/root" "$MANIFEST"
  fi
fi
# ... and the binary it runs (CARGO_BIN_EXE_flamingo, the CLI test) where the build left it.
mkdir -p "$PACK/root/target/release" && ln -sf "$PACK/flamingo" "$PACK/root/target/release/flamingo"

# NVRTC (for doctor, and for any kernel file without a prebuilt image) from the image's CUDA toolkit.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export FLAMINGO_CACHE_DIR=/tmp/flamingo-kernels
# cuBLAS, the matmul ceiling's yardstick: from that toolkit, else from PyTorch's CUDA 13 wheels (via CUDA_PATH, the
# second place the backend looks).
if ! ls "$CUDA_HOME"/lib64/libcublas.so.* "$CUDA_HOME"/lib/libcublas.so.* >/dev/null 2>&1; then
  WHEELS="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null)/cu13"
  if ls "$WHEELS"/lib/libcublas.so.* >/dev/null 2>&1; then export CUDA_PATH="$WHEELS"; fi
fi
SANITIZER="$(command -v compute-sanitizer || ls "$CUDA_HOME"/bin/compute-sanitizer "$CUDA_HOME"/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)"
SANITIZER="${SANITIZER:-compute-sanitizer}"
export RUST_BACKTRACE=1

rows=()
# step NAME CAP_SECONDS COMMAND...: runs it with a time cap, logs to $OUT/NAME.log, records a table row.
step() {
  local name="$1" cap="$2"; shift 2
  local log="$OUT/$name.log" start rc note
  start=$(date +%s)
  echo "== $name (cap ${cap}s): $*"
  timeout --kill-after=5 "$cap" "$@" > "$log" 2>&1; rc=$?
  # On the device the GPU tests must find the GPU: falling back to the simulated device is a failure here.
  if [ "$rc" = 0 ] && grep -q 'gpu tests on the simulated CUDA device' "$log"; then rc=3; fi
  note=$(summarise "$name" "$log" "$rc")
  rows+=("$(printf '| %-10s | %-4s | %4ss | %s |' "$name" "$([ "$rc" = 0 ] && echo ok || echo FAIL)" "$(( $(date +%s) - start ))" "$note")")
  tail -n 5 "$log"
  return 0
}

summarise() {  # one line per step for the table
  local name="$1" log="$2" rc="$3"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && { echo "timed out"; return; }
  [ "$rc" = 3 ] && { echo "ran on the simulated device, not the GPU"; return; }
  case "$name" in
    smi) grep -m1 -oE 'NVIDIA H[0-9]+[^|]*|Driver Version: [0-9.]+' "$log" | tr '\n' ' ' ;;
    doctor) grep -E '^(driver|devices|prebuilt|nvrtc|cublas):|compile|FAIL' "$log" | tr -s ' ' | tr '\n' ';' | cut -c1-200 ;;
    tests) grep -E '^test result:' "$log" | tail -1; grep -E '^test .* FAILED$' "$log" | tr '\n' ' ' ;;
    engine) grep -o '"generated_ids":\[[^]]*\]' "$log"; grep -m1 -E '^ceilings:' "$log" | cut -c1-160;
            grep -m1 -E '^trace events:' "$log" ;;
    memcheck|racecheck|synccheck) grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY|hazard' "$log" || echo "rc $rc" ;;
    bench) grep -E 'time:' "$log" | wc -l | sed 's/$/ benches timed/' ;;
  esac
}

step smi 10 nvidia-smi
# First, and short: the warp-synchronisation check on what the simulator found divergent (decode attention) and on
# the recorded steps, so a hang there costs 35 s, not the whole budget.
step synccheck 35 "$SANITIZER" --tool synccheck --error-exitcode 1 \
  "$PACK/gpu-tests" --test-threads=1 paged_attention_matches_cpu recorded_steps_in_a_fixed_shape_equal_eager_steps
step doctor 30 "$PACK/flamingo" doctor
step tests 110 "$PACK/gpu-tests" --test-threads=1
# generate, then profile (per-op CUDA-event times, the cuBLAS ceiling, a Chrome trace that must parse).
step engine 30 bash -c '"$0" generate --device cuda --json --max-new-tokens 8 &&
  "$0" profile --synthetic tiny --device cuda --decode-steps 4 --trace /tmp/flamingo-trace.json &&
  python3 -c "import json; print(\"trace events:\", len(json.load(open(\"/tmp/flamingo-trace.json\"))[\"traceEvents\"]))"' \
  "$PACK/flamingo"
step memcheck 35 "$SANITIZER" --tool memcheck --error-exitcode 1 \
  "$PACK/gpu-tests" --test-threads=1 paged_attention_matches_cpu cross_attention_matches_cpu embedding_and_data_movement \
  cuda_graph_replays
step racecheck 30 "$SANITIZER" --tool racecheck --error-exitcode 1 \
  "$PACK/gpu-tests" --test-threads=1 resampler_attention_matches_cpu rope_matches_cpu sampling_matches_cpu
step bench 20 "$PACK/cuda-bench" --bench --warm-up-time 0.3 --measurement-time 1

{
  echo "# device check, commit $(cat "$PACK/commit" 2>/dev/null), $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "| step       | ok?  | time  | result |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo '```'
  grep -E 'time:|thrpt:|^cuda/' "$OUT/bench.log" 2>/dev/null | head -40
  echo '```'
} > "$OUT/summary.md"
echo
cat "$OUT/summary.md"
! printf '%s\n' "${rows[@]}" | grep -q '| FAIL |'
