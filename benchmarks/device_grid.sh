#!/usr/bin/env bash
# The MedMNIST grid for one dataset on the GPU machine (used for AdrenalMNIST3D at 64^3, about 12x the CPU time of
# the 28^3 rows), run from the repository root there:
#
#   bash benchmarks/device_grid.sh adrenalmnist3d_64 [seconds per criterion, default 420]
#   (device tool: carry [".whl", ".gpudata"]; .gpudata/medmnist/<file>.npz is a copy of ../shared/data/medmnist,
#    which does not travel; results come back as $OUT/grid.tgz)
#
# 1. installs the pure-python wheels in .whl/ (as benchmarks/device_check.sh does);
# 2. trains (or loads) the unpruned model once: run.py --methods none --device cuda;
# 3. runs one run.py process per criterion in parallel on the one GPU (2 CPU threads each; latency is measured on
#    the CPU), ratios in the order 70 / 95 / 90 / 85 / 98 / 50 % so that a cut-short run keeps the headline rows;
#    every process writes its own accuracy.csv (rows are appended as they finish);
# 4. packs OUT/grid/{base,<criterion>}/accuracy.csv, the cache (base model, test predictions) and the logs into
#    $OUT/grid.tgz. Merge here with: python benchmarks/merge_rows.py (see BENCHMARKS.md).
set -u
OUT="${OUT:-/tmp/device_grid_out}"
DS="${1:-adrenalmnist3d_64}"
T="${2:-420}"
mkdir -p "$OUT"
R=/tmp/grid
rm -rf "$R" && mkdir -p "$R/cache"
# a cache brought along (.gpudata/cache: base model and predictions of an earlier run) is reused
[ -d .gpudata/cache ] && cp -r .gpudata/cache/. "$R/cache/"

rm -rf /tmp/site && mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MONAI_IAPRUNE_DATA="$PWD/.gpudata"
nvidia-smi -L
python3 -c "import torch, monai, zennit, torch_pruning; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"

echo "=== base model ($(date +%T))"
OMP_NUM_THREADS=8 timeout 300 python3 benchmarks/run.py --device "${DEV:-cuda}" --datasets "$DS" --methods none ${EXTRA:-} \
    --out "$R/base" --cache "$R/cache" --no-md 2>&1 | grep -v '^|' | tee "$R/base.log"

echo "=== criteria ($(date +%T))"
for m in lrp ig dlb magnitude taylor random; do
    OMP_NUM_THREADS=2 timeout "$T" python3 benchmarks/run.py --device "${DEV:-cuda}" --datasets "$DS" --methods "$m" \
        --ratios 0.7 0.95 0.9 0.85 0.98 0.5 --out "$R/$m" --cache "$R/cache" --no-md ${EXTRA:-} > "$R/$m.log" 2>&1 &
done
wait
echo "=== done ($(date +%T))"
for m in lrp ig dlb magnitude taylor random; do
    echo "--- $m: $(grep -c '^\[row\]' "$R/$m.log") rows"
    grep -E '^\[(fail|skip)\]|Error|Traceback' "$R/$m.log" | head -5
done
tar czf "$OUT/grid.tgz" -C "$R" .
ls -la "$OUT"
