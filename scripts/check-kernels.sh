#!/usr/bin/env bash
# Compile every kernels/*.cu to an sm_90 cubin with ptxas verbose output and fail on
# compile errors, register spills or non-zero stack frames.  Also compiles each file
# through NVRTC (the path the engine uses at run time) when python3 can load it.
#
# Usage: bash scripts/check-kernels.sh [file.cu ...]      (default: all kernels/*.cu)
# Env:   CUDA_DIR  toolchain folder (default: <repo>/.toolchain/cuda, git-ignored)
#        SKIP_NVRTC=1  skip the NVRTC compile check
#        JOBS      parallel nvcc jobs (default: nproc)
# Every file with ACT_KERNELs is compiled twice, as the engine builds it: as is (bf16 activations) and with
# -DFE_ACT_F16 (f16 activations, kernels/common.cuh).
# Output: target/kernels/<name>.<act>.cubin, <name>.<act>.ptxas.txt, summary.txt
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# --- 1. CUDA 13.0 toolchain from PyPI (pins: shared/docs/toolchain.md) ------------------
# 13.0 because the H200's driver is 580.x (CUDA 13.0): newer nvcc emits PTX it cannot JIT.
# nvidia-nvvm must be pinned too (nvcc's own dependency on it is unpinned -> 13.5 cicc).
CUDA_WHEELS_VER=13.0.88
CUDA_DIR="${CUDA_DIR:-$ROOT/.toolchain/cuda}"
CUDA_STAMP="$CUDA_DIR/.installed-$CUDA_WHEELS_VER"
CUDA_HOME="$CUDA_DIR/nvidia/cu13"
NVCC="$CUDA_HOME/bin/nvcc"

if [ ! -f "$CUDA_STAMP" ]; then
  command -v python3 >/dev/null || { echo "error: python3 not found (needed to install the CUDA wheels)" >&2; exit 1; }
  python3 -m pip --version >/dev/null 2>&1 || { echo "error: pip not available for python3" >&2; exit 1; }
  echo "== installing CUDA $CUDA_WHEELS_VER compiler wheels into $CUDA_DIR (~186 MB download)"
  # pip --target never merges into an existing nvidia/ folder: always start fresh, one call.
  rm -rf "$CUDA_DIR"
  mkdir -p "$(dirname "$CUDA_DIR")" "$ROOT/.toolchain"
  if ! python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --target "$CUDA_DIR" \
      "nvidia-cuda-nvrtc==$CUDA_WHEELS_VER" "nvidia-cuda-nvcc==$CUDA_WHEELS_VER" \
      "nvidia-nvvm==$CUDA_WHEELS_VER" "nvidia-cuda-crt==$CUDA_WHEELS_VER" \
      "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" \
      > "$ROOT/.toolchain/pip.log" 2>&1; then
    grep -v "Running pip as the 'root' user" "$ROOT/.toolchain/pip.log" >&2 || true
    echo "error: pip install of the CUDA wheels failed (log: .toolchain/pip.log)" >&2
    exit 1
  fi
  if [ ! -x "$NVCC" ] || [ ! -f "$CUDA_HOME/lib/libnvrtc.so.13" ]; then
    echo "error: CUDA wheels installed but $NVCC or libnvrtc.so.13 is missing" >&2
    exit 1
  fi
  touch "$CUDA_STAMP"
fi
export CUDA_HOME
export LD_LIBRARY_PATH="$CUDA_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== $("$NVCC" --version | grep -o 'release [0-9.]*, V[0-9.]*')  ($NVCC)"

# --- 2. compile every kernel file -----------------------------------------------------------
OUT="$ROOT/target/kernels"
mkdir -p "$OUT"
if [ "$#" -gt 0 ]; then FILES=("$@"); else FILES=(kernels/*.cu); fi
[ -e "${FILES[0]}" ] || { echo "error: no kernels/*.cu files found" >&2; exit 1; }
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

# "<file>.cu <act>" for every variant the engine builds.
variants() {
  local f
  for f in "$@"; do
    echo "$f bf16"
    if grep -q 'ACT_KERNEL(' "$f"; then echo "$f f16"; fi
  done
}

compile_one() {   # $1 = path/to/file.cu, $2 = bf16 | f16 ; writes $OUT/<name>.<act>.{cubin,ptxas.txt,rc}
  local src="$1" act="$2" name arch define=()
  name="$(basename "$src" .cu).$act"
  [ "$act" = f16 ] && define=(-DFE_ACT_F16)
  arch="arch=compute_90,code=sm_90"
  # wgmma / setmaxnreg only assemble for the arch-specific sm_90a target.
  if grep -qE 'wgmma|setmaxnreg' "$src"; then arch="arch=compute_90a,code=sm_90a"; fi
  local rc=0
  "$NVCC" -cubin -gencode "$arch" -std=c++17 -O3 -Xptxas -v -Xptxas -warn-spills -Xptxas -warn-lmem-usage \
      "${define[@]}" -I"$ROOT/kernels" -o "$OUT/$name.cubin" "$src" > "$OUT/$name.ptxas.txt" 2>&1 || rc=$?
  echo "$rc" > "$OUT/$name.rc"
}
export -f compile_one
export NVCC OUT ROOT

mapfile -t VARIANTS < <(variants "${FILES[@]}")
start=$(date +%s)
printf '%s\n' "${VARIANTS[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one $1' _ {}
echo "== nvcc: ${#VARIANTS[@]} compiles of ${#FILES[@]} files in $(( $(date +%s) - start )) s (JOBS=$JOBS)"

# --- 3. parse the ptxas reports ----------------------------------------------------------------
fail=0
summary="$OUT/summary.txt"
: > "$summary"
printf '%-24s %-40s %5s %7s %7s %7s %7s\n' file kernel regs smem stack spill_st spill_ld | tee -a "$summary"
for variant in "${VARIANTS[@]}"; do
  src="${variant% *}"
  name="$(basename "$src" .cu).${variant#* }"
  rep="$OUT/$name.ptxas.txt"
  if [ "$(cat "$OUT/$name.rc")" != 0 ]; then
    echo "COMPILE ERROR in $src:" >&2
    grep -v '^ptxas info' "$rep" >&2 || true
    fail=1
    continue
  fi
  # ptxas -v prints, per function:
  #   ptxas info : Compiling entry function 'NAME' for 'sm_90'
  #   ptxas info : Function properties for NAME
  #       S bytes stack frame, A bytes spill stores, B bytes spill loads
  #   ptxas info : Used R registers, used N barriers, M bytes smem, ...
  # A "Function properties" block without "Used" belongs to a non-inlined device function.
  awk -v file="$name" '
    /Compiling entry function/ { match($0, /function .[^ ]*. for/); fn = substr($0, RSTART + 10, RLENGTH - 15) }
    /Function properties for/  { p = $0; sub(/.*Function properties for /, "", p); cur = p }
    /bytes stack frame/        { st[cur] = $1; ss[cur] = $5; sl[cur] = $9; order[++n] = cur }
    /Used [0-9]+ registers/    { r = $0; sub(/.*Used /, "", r); sub(/ registers.*/, "", r); regs[fn] = r
                                 m = 0; if (match($0, /[0-9]+ bytes smem/)) m = substr($0, RSTART, RLENGTH - 11); smem[fn] = m }
    END {
      for (i = 1; i <= n; i++) { f = order[i]; if (seen[f]++) continue
        printf "%-24s %-40s %5s %7s %7s %7s %7s\n", file, f, (f in regs ? regs[f] : "-"), (f in smem ? smem[f] : "-"), st[f], ss[f], sl[f] }
    }' "$rep" | tee -a "$summary"
  if grep -qE 'warning|error' "$rep"; then
    echo "-- warnings in $src:" >&2; grep -E 'warning|error' "$rep" >&2
  fi
  if ! grep -q 'Compiling entry function' "$rep"; then
    echo "error: $src produced no kernels" >&2; fail=1
  fi
done

# Any spill or stack frame is a failure: it means local-memory traffic in a hot loop.
if awk '$5 ~ /^[0-9]+$/ && ($5 > 0 || $6 > 0 || $7 > 0) { bad = 1; print "SPILL/STACK: " $0 > "/dev/stderr" } END { exit !bad }' "$summary"; then
  fail=1
fi
nk=$(awk 'NR > 1' "$summary" | wc -l)

# --- 4. NVRTC compile (the engine JIT path): no system headers, only CUDA_HOME/include ---------
if [ "${SKIP_NVRTC:-0}" != 1 ]; then
  if ! python3 - "$CUDA_HOME" "$ROOT/kernels" "${VARIANTS[@]}" <<'PY'
import ctypes, sys, os, time
cuda_home, kdir, variants = sys.argv[1], sys.argv[2], [v.split() for v in sys.argv[3:]]
lib = os.path.join(cuda_home, "lib")
# libnvrtc.so.13 (13.0) has no RPATH: preload its builtins so dlopen finds them.
ctypes.CDLL(os.path.join(lib, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
nv = ctypes.CDLL(os.path.join(lib, "libnvrtc.so.13"))
nv.nvrtcGetErrorString.restype = ctypes.c_char_p
bad = 0
for f, act in variants:
    src = open(f, "rb").read()
    wg = b"wgmma" in src or b"setmaxnreg" in src
    prog = ctypes.c_void_p()
    rc = nv.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(f).encode(), 0, None, None)
    opts = [b"--gpu-architecture=" + (b"sm_90a" if wg else b"sm_90"), b"-std=c++17",
            b"--include-path=" + kdir.encode(), b"--include-path=" + os.path.join(cuda_home, "include").encode()]
    if act == "f16":
        opts.append(b"-DFE_ACT_F16")
    arr = (ctypes.c_char_p * len(opts))(*opts)
    t = time.time()
    rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t(); nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value); nv.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        bad = 1
        print(f"NVRTC ERROR {f} ({act}): {nv.nvrtcGetErrorString(rc).decode()}\n{log.value.decode(errors='replace')}", file=sys.stderr)
    else:
        print(f"nvrtc ok  {os.path.basename(f):<24} {act:<4} {1000 * (time.time() - t):7.0f} ms")
    nv.nvrtcDestroyProgram(ctypes.byref(prog))
sys.exit(bad)
PY
  then
    fail=1
  fi
fi

echo "== $nk kernels; reports in target/kernels/"
if [ "$fail" != 0 ]; then
  echo "FAILED: compile error, NVRTC error, register spill or stack frame (see above)" >&2
  exit 1
fi
echo "OK: all kernels compile with no spills and no stack frames"
