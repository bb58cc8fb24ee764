#!/usr/bin/env bash
# tools/cudasim/sanitize.sh asan|tsan [test name...]: the kernel parity tests of tests/gpu.rs on the simulated device
# built with AddressSanitizer (stands in for compute-sanitizer's memcheck: global memory, and shared memory, which
# lives in per-block heap arenas) or ThreadSanitizer (racecheck: every CUDA thread is a TSan fiber, ordered only by
# __syncthreads, __syncwarp and launch boundaries). Exits non-zero on a report or a failed test.
#
# The sanitizer runtime is preloaded into the (uninstrumented) Rust test executable; only the simulator and the
# kernels are instrumented, and TSan ignores what uninstrumented code does (ignore_noninstrumented_modules).
set -euo pipefail
variant=${1:?usage: tools/cudasim/sanitize.sh asan|tsan [test name...]}
shift
cd "$(dirname "$0")/../.."
case $variant in
  asan) export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 ;;
  tsan) export TSAN_OPTIONS=ignore_noninstrumented_modules=1:halt_on_error=1:exitcode=66:report_signal_unsafe=0 ;;
  *) echo "sanitize.sh: unknown variant $variant (asan, tsan)" >&2; exit 2 ;;
esac
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  # Every kernel the backend launches (kernels/README.md has the map); the GEMMs through the bit-identity test
  # (both tile sizes, 65-640 rows) and the GEMV through the cuBLAS comparison, which are smaller than
  # linear_matches_cpu's 1000x3000x264.
  tests=(gemm_rows_are_bit_identical_across_batch_sizes cublas_product_matches_our_linear
         norms_and_elementwise_ops_match_cpu embedding_and_data_movement_match_cpu rope_matches_cpu
         vision_attention_matches_cpu cross_attention_matches_cpu resampler_attention_matches_cpu
         paged_attention_matches_cpu sampling_matches_cpu)
fi

exe=$(CUDASIM_VARIANTS=$variant cargo test --release --test gpu --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
runtime=$(${CUDASIM_CXX:-${CXX:-c++}} -print-file-name="lib$variant.so")
echo "== cudasim $variant: ${tests[*]}"
status=0
for t in "${tests[@]}"; do
  start=$(date +%s)
  # bf16 kernels only: their f16 variant is the same code over a type of the same width (tests/gpu.rs says more).
  if GPU_TEST_DTYPES=${GPU_TEST_DTYPES:-bf16} RAYON_NUM_THREADS=1 CUDASIM_VARIANT=$variant LD_PRELOAD="$runtime" "$exe" --exact "$t" --test-threads 1 -q \
      > "/tmp/cudasim-$variant-$t.log" 2>&1; then
    echo "ok   $t ($(( $(date +%s) - start )) s)"
  else
    echo "FAIL $t ($(( $(date +%s) - start )) s):"
    grep -v '^\s*[0-9]*: \|^\s*at ' "/tmp/cudasim-$variant-$t.log" | head -60
    status=1
  fi
done
exit $status
