#!/usr/bin/env bash
# One-shot GPU check, run from the repository root on the GPU machine (torch preinstalled there; the project's
# pure-python dependencies travel as wheels in .whl/, see the report of task h13):
#
#   bash benchmarks/device_check.sh            (carry: [".whl"]; results under $OUT)
#
# Steps (each one runs whatever happened before; exit codes are collected and printed at the end):
#   0. install .whl/*.whl into /tmp/site (pip --target; unzip as a fallback), PYTHONPATH=/tmp/site:$PWD
#   1. environment: nvidia-smi -L, python / torch / CUDA / cuDNN versions, imports of every dependency
#   2. tests/test_cuda.py on the GPU (timeout 120 s)           -> $OUT/pytest_cuda.log
#   3. benchmarks/gpu_latency.py (timeout 200 s)                -> $OUT/latency_gpu.{csv,json,md}, gpu_latency.log
#   4. the whole test suite, 8 workers (timeout 240 s)          -> $OUT/pytest_all.log
# Every step's output is also in $OUT/<step>.log; exit codes in $OUT/exit_codes.txt.
# The GPU-specific steps run before the broad suite so that a lease cut short still brings them back.
# Timeouts (seconds) can be changed: T_CUDA (default 120), T_LATENCY (200), T_ALL (240).
# Known there: tests/test_data.py's ITKReader round trip fails (itk ships binary wheels only, not carried);
# tests needing ../shared/data or tensorboard skip.

set -u
OUT="${OUT:-/tmp/device_check_out}"
mkdir -p "$OUT"
declare -A RC
ORDER=()

run_step() {  # run_step NAME COMMAND...: output to the terminal and $OUT/NAME.log; record the status, never stop
    local name="$1"
    shift
    echo "=== [$name] $* ($(date +%T))"
    "$@" 2>&1 | tee "$OUT/$name.log"
    RC[$name]=${PIPESTATUS[0]}
    ORDER+=("$name")
    echo "=== [$name] exit ${RC[$name]} ($(date +%T))"
}

install_wheels() {
    rm -rf /tmp/site && mkdir -p /tmp/site
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl; then
        echo "pip install failed: unpacking the wheels instead (they are plain zip files)"
        for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site || return 1; done
    fi
    ls /tmp/site
}

environment() {
    nvidia-smi -L
    python3 - <<'PY'
import importlib, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
bad = []
for mod in ("monai_iaprune", "monai", "monai.engines", "monai.bundle", "zennit", "captum", "torch_pruning",
            "ignite", "fire", "nibabel", "torchvision", "numpy", "scipy", "matplotlib", "yaml", "einops", "tqdm",
            "PIL", "pytest", "xdist", "dl_backtrace.pytorch_backtrace.backtrace"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod:45s} {getattr(m, '__version__', '')} {getattr(m, '__file__', '')}")
    except Exception as e:
        bad.append(mod)
        print(f"  {mod:45s} IMPORT FAILED: {type(e).__name__}: {e}")
sys.exit(1 if bad else 0)
PY
}

run_step install install_wheels
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
run_step environment environment
# pytest_cuda.log, gpu_latency.log, pytest_all.log under $OUT
run_step pytest_cuda timeout "${T_CUDA:-120}" python3 -m pytest -q -p no:cacheprovider -rfEs --durations=15 tests/test_cuda.py
run_step gpu_latency timeout "${T_LATENCY:-200}" python3 benchmarks/gpu_latency.py --out "$OUT"
run_step pytest_all timeout "${T_ALL:-240}" python3 -m pytest -q -p no:cacheprovider -rfE --durations=20 -n 8 tests/

status=0
{
    echo "=== exit codes (0 ok; 124 timeout; pytest: 1 test failures, 4/5 usage or nothing collected)"
    for name in "${ORDER[@]}"; do
        echo "  $name: ${RC[$name]}"
        [ "${RC[$name]}" = 0 ] || status=1
    done
} > "$OUT/exit_codes.txt"
cat "$OUT/exit_codes.txt"
exit $status
