#!/usr/bin/env bash
# Every GPU test and benchmark in one call of the lent GPU machine, in under 8 minutes.
#
# Prepare once, here (diffusers is missing there; it is pure Python; setuptools >= 77 builds
# pyproject.toml's SPDX license string, and the install below uses the machine's own or this one):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 importlib_metadata setuptools==84.2.1 pytest-xdist==3.8.0 execnet==2.1.2
# Then run it there with the device tool: command `bash benchmarks/device_check.sh`, carry [".whl"].
# Logs and JSON land in $OUT (or /tmp/device_check); the last thing printed is a short table.
# STEPS="cuda_tests kernels" (a space-separated subset of the step names below) reruns only those.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
STEPS=${STEPS:-"kernels latency_sd15 profile cuda_tests"}  # latency_tiny: on request
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# fastdiff itself, without touching the machine's torch/triton.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/install.log 2>&1 \
  || { echo "install failed"; tail -20 /tmp/install.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"

declare -a NAMES CODES SECS
stamp() {  # prefix each line with the seconds since the step began
  local t0=$SECONDS line
  while IFS= read -r line; do echo "[$((SECONDS - t0))s] $line"; done
}
step() {  # step NAME TIMEOUT_S CMD...: run if NAME is in $STEPS, log to $OUT/NAME.log, keep exit code and seconds
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local t0=$SECONDS
  echo "=== $name: $*"
  if [[ $name == *_tests ]]; then
    timeout -k 5 "$limit" "$@" 2>&1 | grep --line-buffered -v -E "PytestBenchmarkWarning|warner\(" | stamp | tee "$OUT/$name.log"
  else
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  fi
  local rc=${PIPESTATUS[0]}
  NAMES+=("$name"); CODES+=("$rc"); SECS+=($((SECONDS - t0)))
}

# Kernel and pipeline timings first, then the tests. Limits: 160 + 110 + 45 + 145 s = 460 s, with
# the set-up above inside 8 minutes. The latency step holds the pipeline's first call at 512x512
# (GroupNorm shapes and kernels the kernels step did not tune or compile: a review estimated 20-45
# s); its log prints each runner's first call as it ends.
# The kernels step includes the first-call tuning: attention's autotuner compiles and times up to 15
# configs per shape (64 over the 8 shapes), GroupNorm's tuner up to 9 launch plans per shape (17
# from 16 MB: the last-first variants, timed over rotating copies). The VAE's (1,128,512,512)
# GroupNorm rows come last. Rows are printed and saved as they land, so a step cut at its limit
# keeps what it measured, and its goal lines still print (over the rows measured).
step kernels 160 python3 benchmarks/kernel_bench.py --dtype fp16 --json "$OUT/kernels.json"
# SD1.5 at 512x512 fp16: diffusers (SDPA) vs fastdiff's default (graphs + Triton + NHWC on CUDA,
# SDPA at attention shapes where it timed faster), with the Triton kernels at every shape, and
# with torch's ops in place of the Triton kernels, interleaved in one run. The NCHW and
# no-graph variants (torch:nchw, torch:nograph) were measured in run 2 (NOTES-gpu.md); add them to
# LATENCY_BACKENDS to measure them again.
LATENCY_BACKENDS=${LATENCY_BACKENDS:-torch,torch:triton,torch:torchops}
step latency_sd15 110 python3 benchmarks/latency.py --model sd15 --random-weights --device cuda --dtype float16 \
  --height 512 --width 512 --steps 25 --repeats 3 --backends "$LATENCY_BACKENDS" \
  --json "$OUT/latency_sd15.json" --quiet
# Where the UNet step's GPU time goes, by kernel category, Triton kernels vs torch's ops.
step profile 45 python3 benchmarks/profile_step.py  # the table is in profile.log: $OUT brings back 8 files at most
step latency_tiny 60 python3 benchmarks/latency.py --device cuda --dtype float16 --backends torch --repeats 5 \
  --json "$OUT/latency_tiny.json" --quiet

# Tests in parallel workers where pytest-xdist is installed (Triton's compiles, one per autotune
# config and specialisation, are CPU-bound), each result printed as it lands with the seconds
# since the start, and each failure's traceback appended to failures.txt at once, so a run cut
# at its limit still says what failed and why. The sm_90 compile-only builds and the *_cpu tests
# are CPU CI's (run here they oversubscribed the 16 cores: 12 workers x 16 torch threads each, and
# timed out); one torch thread per worker for the rest.
PYTEST=(python3 -m pytest -v -p no:cacheprovider -rfE --tb=short --durations=15)
# pyproject's addopts put each test file on one worker: here the tests of one file spread over
# the 12 (--dist load); without pytest-xdist those addopts are dropped and the tests run serially.
if python3 -c "import xdist" 2>/dev/null; then PYTEST+=(-n 12 --dist load); else PYTEST+=(-o "addopts=-ra"); fi
python3 -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 120)
export FASTDIFF_FAILURE_LOG="$OUT/failures.txt"
OMP_NUM_THREADS=1 step cuda_tests 145 "${PYTEST[@]}" -k "not sm90 and not cpu" tests/test_gpu_path.py tests/test_kernels.py tests/test_tensorrt.py

echo
echo "---- summary (logs in $OUT) ----"
cat "$OUT/gpu.txt"
[[ -f "$OUT/cuda_tests.log" ]] && grep -E "(FAILED|ERROR) " "$OUT/cuda_tests.log" | cut -c1-170 | head -20
[[ -f "$OUT/cuda_tests.log" ]] && grep -E "[0-9]+ (passed|failed)" "$OUT/cuda_tests.log" | tail -1
[[ -f "$OUT/failures.txt" ]] && grep -E "^(====|E )" "$OUT/failures.txt" | cut -c1-170 | head -30
[[ -f "$OUT/kernels.log" ]] && grep -E "ceilings|^(SDPA|kernel|attention|group_norm|geglu|layer_norm|goal)" "$OUT/kernels.log" | cut -c1-260
[[ -f "$OUT/profile.log" ]] && sed -n '/^category/,/^costliest/p' "$OUT/profile.log" | head -12
for f in latency_sd15 latency_tiny; do
  [[ -f "$OUT/$f.log" ]] && grep -E "^(model|[0-9]+x[0-9]+|stage|text encoder|UNet per step|denoising|VAE|end-to-end|parity|first call|auto attention)" "$OUT/$f.log" | cut -c1-260
done
printf '%-14s %6s %6s\n' step rc seconds
for i in "${!NAMES[@]}"; do printf '%-14s %6s %6s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"; done
