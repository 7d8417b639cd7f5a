#!/usr/bin/env bash
# Everything issue 13 asks of a session with a GPU, in one run, into one folder.
#
#   bash .ci/gpu_check.sh              on a machine with an NVIDIA GPU
#   bash .ci/gpu_check.sh --dry-run    here, without one: the same steps at toy sizes on the
#                                      CPU and Numba's CUDA simulator (checks the plumbing)
#
# Output: $OUT when set (the device tool's folder), else gpu_check_<UTC date>/. At most 8
# files, so that the device tool brings every one back:
#   summary.txt          environment, each step's exit code, seconds and last lines
#   tests_gpu.log        pytest -m gpu (every GPU test)
#   tests_suite.log      the rest of the suite, with the GPU present (pytest -m "not gpu")
#   kernels_bench.txt    python -m tinyunet.kernels.bench --device gpu (its GPU columns)
#   bench_unet.txt       examples/bench_unet.py --device gpu, 256 and 512, batches 2 and 8
#   train.log            examples/train_membranes.py --device gpu (the main job)
#   artifacts.tar.gz     the benchmarks' results.json/.md/.png and JSON, the run folder's
#                        metrics.json, final.json, report.txt, curves.png, montage.png
#
# Time: the whole script stops inside DEADLINE_S (default 470 s, under 8 minutes on one GPU):
# each step runs under `timeout` with what is left, the most telling first; a step that no
# time is left for is recorded as skipped. The main job trains for TRAIN_MINUTES (default 1.5)
# instead of its default 8 minutes, so that it fits: its figures are for that budget.
#
# Installing: nothing can be fetched on the lent GPU machines, whose image already holds CuPy
# (cupy-cuda13x), numba-cuda and PyTorch with CUDA. So the script installs the gpu extra
# (pip install -e ".[gpu]": cupy-cuda12x[ctk], numba-cuda[cu12]) only where CuPy cannot run a
# kernel, and PyTorch (plain `pip install torch`: the index's Linux x86_64 wheel is built with
# CUDA) only where torch.cuda is unavailable; tinyunet itself goes in with --no-deps.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUTDIR=${OUT:-$ROOT/gpu_check_$(date -u +%Y%m%d_%H%M%S)}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d)
SUMMARY=$OUTDIR/summary.txt
DEADLINE_S=${DEADLINE_S:-470}
TRAIN_MINUTES=${TRAIN_MINUTES:-1.5}
STARTED=$(date +%s)
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ $DRY == 1 && -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=python3
fi
export PYTHONUNBUFFERED=1
# The real CUDA target, never the simulator (tests/conftest.py would switch the simulator on
# where ctypes cannot find libcuda by name, as in some containers); under --dry-run the simulator.
if [[ $DRY == 1 ]]; then export NUMBA_ENABLE_CUDASIM=1; else export NUMBA_ENABLE_CUDASIM=0; fi
unset CUPY_TF32                   # float32 GEMMs in CuPy stay float32 (the benchmarks say so)

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S LOG COMMAND...: runs COMMAND under `timeout`, capped by what is left of
# DEADLINE_S, appending its output to LOG; notes the exit code (124: timed out), seconds and
# the last lines in the summary.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$(( DEADLINE_S - ($(date +%s) - STARTED) ))
    (( limit > left )) && limit=$left
    if (( limit < 10 )); then
        note "== $name: SKIPPED, ${left}s left of ${DEADLINE_S}s"
        return
    fi
    echo "== $name (limit ${limit}s): $*" >> "$log"
    local begun=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    note "== $name: rc=$rc in $(( $(date +%s) - begun ))s (limit ${limit}s)  $*"
    tail -n 4 "$log" | sed 's/^/     /' >> "$SUMMARY"
}

note "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')  commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')  dry-run=$DRY"
note "# python: $PY ($($PY --version 2>&1)), deadline ${DEADLINE_S}s, train --minutes $TRAIN_MINUTES, out $OUTDIR"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/# gpu: /' | tee -a "$SUMMARY"
else
    note "# gpu: no nvidia-smi here"
fi

# -- install ----------------------------------------------------------------------------------
if [[ $DRY == 0 ]]; then
    if ! $PY -c "import cupy; assert int(cupy.arange(3).sum()) == 3" >> "$SUMMARY" 2>&1; then
        note "== CuPy cannot run a kernel: pip install -e .[gpu]"
        $PY -m pip install -q -e ".[gpu]" >> "$SUMMARY" 2>&1 || note "   pip install -e .[gpu] FAILED (offline?)"
    fi
    $PY -m pip install -q --no-deps --no-build-isolation -e . >> "$SUMMARY" 2>&1 || note "== pip install -e . FAILED"
    if ! $PY -c "import torch; assert torch.cuda.is_available()" >> "$SUMMARY" 2>&1; then
        note "== PyTorch with CUDA missing: pip install torch"
        $PY -m pip install -q torch >> "$SUMMARY" 2>&1 || note "   pip install torch FAILED (offline?)"
    fi
fi
if ! (cd /tmp && $PY -c "import tinyunet.kernels") >> "$SUMMARY" 2>&1; then
    # No editable install (an old setuptools, say): the package laid out by hand, kernels/ as
    # tinyunet.kernels (setup.cfg's package_dir), on PYTHONPATH.
    note "== tinyunet does not import after pip install -e .: using a copy on PYTHONPATH"
    LAYOUT=$(mktemp -d)
    cp -r tinyunet "$LAYOUT/" && ln -s "$ROOT/kernels" "$LAYOUT/tinyunet/kernels"
    export PYTHONPATH=$LAYOUT${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - >> "$SUMMARY" 2>&1 <<'EOF'
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:     # pytest makes any of these an error
    import tinyunet.backend, tinyunet.kernels
    tinyunet.kernels.available()
for w in caught:
    print(f"# WARNING at import (an error under pytest): {w.category.__name__}: {w.message}")
import importlib.metadata as md
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"
print("# packages:", ", ".join(f"{n} {version(n)}" for n in
      ("numpy", "numba", "numba-cuda", "cupy-cuda12x", "cupy-cuda13x", "torch", "pytest", "hypothesis")))
from tinyunet import backend, kernels
print("# tinyunet GPU check:", backend._why_no_gpu() or "the GPU runs a kernel", "|", backend.gpu_name())
print("# kernel implementations:", {k: v or "available" for k, v in kernels.available().items()})
try:
    import torch
    print("# torch.cuda:", torch.cuda.is_available(), torch.version.cuda,
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as error:
    print("# torch:", type(error).__name__, error)
EOF

XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n 8)

if [[ $DRY == 1 ]]; then
    KB=(--device cpu --size 16 --base-width 4 --repeats 1 --settle 0 --no-methods)
    BU_SIZES=(16); BU_BATCHES=(1); BU=(--device cpu --steps 1)
    TRAIN=(--device cpu --steps 2 --crop 32 --batch 1 --base-width 4 --depth 2 --synthetic-count 5 --eval-every 2)
    SUITE=(tests/test_kernels_cuda.py tests/test_gpu_bench.py tests/test_gpu_dropout.py tests/test_gpu_training.py)
else
    KB=(--device gpu --repeats 5 --settle 0)
    BU_SIZES=(256 512); BU_BATCHES=(2 8); BU=(--device gpu --steps 5)
    TRAIN=(--device gpu --minutes "$TRAIN_MINUTES")
    SUITE=()
fi

# -- 1. every GPU test (the most telling: first) ---------------------------------------------------
step "GPU tests" 150 "$OUTDIR/tests_gpu.log" $PY -m pytest -m gpu -q -rA -p no:cacheprovider

# -- 2. the kernel benchmark with its GPU columns ----------------------------------------------------
step "kernel bench" 90 "$OUTDIR/kernels_bench.txt" \
    $PY -m tinyunet.kernels.bench "${KB[@]}" --quiet --out "$WORK/kernels_bench"

# -- 3. a training step of the exact U-Net against PyTorch + cuDNN -----------------------------------
for batch in "${BU_BATCHES[@]}"; do
    step "bench_unet batch $batch" 75 "$OUTDIR/bench_unet.txt" \
        $PY examples/bench_unet.py "${BU[@]}" --sizes "${BU_SIZES[@]}" --batch "$batch" \
        --json "$WORK/bench_unet_batch$batch.json"
done

# -- 4. the main job, on a shortened budget ----------------------------------------------------------
step "main job" 150 "$OUTDIR/train.log" \
    $PY examples/train_membranes.py "${TRAIN[@]}" --out "$WORK/membranes" --no-progress

# -- 5. the rest of the suite with the GPU present ---------------------------------------------------
step "test suite" 150 "$OUTDIR/tests_suite.log" \
    $PY -m pytest -m "not gpu" -q -p no:cacheprovider "${XDIST[@]}" "${SUITE[@]}"

# -- what the steps wrote ----------------------------------------------------------------------------
( cd "$WORK" && find . -name '*.json' -o -name '*.md' -o -name '*.png' -o -name '*.txt' \
      | grep -v '/predictions/' | grep -v 'checkpoint' \
      | tar -czf "$OUTDIR/artifacts.tar.gz" -T - ) || note "== artifacts: tar FAILED"
rm -rf "$WORK"
note "# done in $(( $(date +%s) - STARTED ))s; files: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
