#!/usr/bin/env bash
# Every GPU test and benchmark in one call of the lent GPU machine, in under 8 minutes.
#
# Prepare once, here (diffusers is missing there; it is pure Python):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 importlib_metadata
# Then run it there with the device tool: command `bash benchmarks/device_check.sh`, carry [".whl"].
# Logs and JSON land in $OUT (or /tmp/device_check); the last thing printed is a short table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# fastdiff itself, without touching the machine's torch/triton.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

declare -a NAMES CODES SECS
step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, remember exit code and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  NAMES+=("$name"); CODES+=("$rc"); SECS+=($((SECONDS - t0)))
}

step cuda_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_path.py tests/test_tensorrt.py
step kernels 90 python3 benchmarks/kernels.py --dtype fp16 --json "$OUT/kernels.json"
step latency_tiny 60 python3 benchmarks/latency.py --device cuda --repeats 5 --json "$OUT/latency_tiny.json" --quiet
step latency_sd15 200 python3 benchmarks/latency.py --model sd15 --random-weights --device cuda --dtype float16 \
  --height 512 --width 512 --steps 25 --repeats 3 --json "$OUT/latency_sd15.json" --quiet

echo
echo "---- summary (logs in $OUT) ----"
grep -E "passed|failed|error" "$OUT/cuda_tests.log" | tail -1
tail -n 25 "$OUT/kernels.log"
tail -n 25 "$OUT/latency_sd15.log"
printf '%-14s %6s %6s\n' step rc seconds
for i in "${!NAMES[@]}"; do printf '%-14s %6s %6s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"; done
