#!/usr/bin/env bash
# The GPU check of the MSDeformAttn op, in one run on a machine with an NVIDIA
# GPU, torch, nvcc and ninja (no mmcv / mmdet needed):
#
#   tools/gpu_check.sh --prepare        # here: copy mmcv's sdist and test into .gpu_carry/
#   tools/gpu_check.sh OUT_DIR          # on the GPU machine, from the repository root
#
# 1. builds projects_detr_plus.ops._C with CUDA for the card (TORCH_CUDA_ARCH_LIST
#    from the device, MAX_JOBS=16) and checks the compiled CUDA kernel is active;
#    meanwhile builds mmcv 2.1.0's MSDeformAttn CUDA op from its sdist;
# 2. benchmarks/msda_op.py --device cuda: ours vs mmcv's kernel vs the PyTorch path,
#    fp32 / fp16 / bf16, JSON named after the card;
# 3. tests/msda_cuda_suite.py (DETR_PLUS_REQUIRE_EXT=1), the mmcv fallback included;
# 4. mmcv's own test of the op, run on ours through tests/mmcv_msda_adapter.py.
# Every step has its own time limit and the run goes on after a failure; the logs and
# the JSON land in OUT_DIR (7 files). GPU_CHECK_STEPS (default "bench suite mmcv")
# picks steps 2-4 for a rerun. Exit status: the number of failed steps.
set -u
cd "$(dirname "$0")/.."
CARRY=${GPU_CHECK_CARRY:-.gpu_carry}

if [ "${1:-}" = "--prepare" ]; then
    REF=${2:-../shared/reference}
    mkdir -p "$CARRY"
    cp "$REF/mmcv-2.1.0.tar.gz" "$CARRY/"
    cp -r --no-preserve=mode "$REF/mmcv-tests" "$CARRY/"
    git check-ignore -q "$CARRY" || echo "warning: $CARRY is not git-ignored"
    du -sh "$CARRY"
    exit 0
fi

OUT=${1:?usage: tools/gpu_check.sh OUT_DIR | --prepare [REFERENCE_DIR]}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MAX_JOBS=${MAX_JOBS:-16}
FAILED=0
log() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
step() {  # step NAME TIMEOUT_S LOGFILE CMD...: run, log the status
    local name=$1 limit=$2 file=$3; shift 3
    log "start $name"
    timeout "$limit" "$@" >"$file" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
    log "end $name: rc=$rc"
    tail -n 5 "$file" | sed 's/^/    /' | tee -a "$LOG"
    return $rc
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import sys, torch; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    nvcc --version | tail -n 2
    command -v ninja
    nproc
} >>"$LOG" 2>&1
CAPABILITY=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAPABILITY}
CARD=$($PY -c "import torch; n = torch.cuda.get_device_name(); \
print(next((c for c in ('h200', 'h100', 'a100', 'l40s', 'l4') if c in n.lower()), \
n.split()[-1].lower()))")
MMCV_SRC="$CARRY/mmcv-2.1.0.tar.gz"
MMCV_BUILD=${MMCV_BUILD:-/tmp/mmcv_msda_build}
log "card $CARD, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"

# 1. both builds at once
step "mmcv op build" 240 "$OUT/mmcv_build.log" \
    $PY benchmarks/msda_op.py --build-mmcv-only --mmcv-src "$MMCV_SRC" \
    --mmcv-build-dir "$MMCV_BUILD" &
MMCV_PID=$!
FORCE_CUDA=1 step "extension build" 240 "$OUT/build.log" $PY setup.py build_ext --inplace
$PY -c "
from projects_detr_plus import ops
info = ops.implementation_info()
print('implementation_info:', info)
assert info['extension_has_cuda'] and info['cuda'] == 'compiled', info
print('compiled CUDA kernel active')" >>"$LOG" 2>&1 || FAILED=$((FAILED + 1))
tail -n 2 "$LOG"
wait $MMCV_PID || FAILED=$((FAILED + 1))
STEPS=${GPU_CHECK_STEPS:-bench suite mmcv}

for name in $STEPS; do
    case $name in
    bench)  # 2. the benchmark
        step "benchmark" 200 "$OUT/bench.log" \
            $PY benchmarks/msda_op.py --device cuda --mmcv-src "$MMCV_SRC" \
            --mmcv-build-dir "$MMCV_BUILD" --ab-bwd-lanes 1 \
            --json "$OUT/msda_op_cuda_$CARD.json" ;;
    suite)  # 3. the CUDA suite
        DETR_PLUS_REQUIRE_EXT=1 DETR_PLUS_MMCV_SRC="$MMCV_SRC" \
            DETR_PLUS_MMCV_BUILD="$MMCV_BUILD" \
            step "cuda suite" 180 "$OUT/suite.log" \
            $PY -m pytest tests/msda_cuda_suite.py -v -rs -p no:cacheprovider ;;
    mmcv)  # 4. mmcv's own test on our op
        step "mmcv test on our op" 90 "$OUT/mmcv_test.log" \
            $PY tests/mmcv_msda_adapter.py \
            "$CARRY/mmcv-tests/test_ms_deformable_attn.py" \
            --mmcv-src "$MMCV_SRC" -v -rs ;;
    *) log "unknown step $name"; FAILED=$((FAILED + 1)) ;;
    esac
done

log "done: $FAILED failed step(s)"
exit $FAILED
