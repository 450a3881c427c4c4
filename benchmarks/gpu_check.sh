#!/usr/bin/env bash
# The GPU figures of the README in one command: no network, no install, no Ray, < 8 min on
# one H100/H200-class GPU. Runs from the checkout (PYTHONPATH=.) on a machine with torch,
# torchvision, pandas, pyarrow, scipy and scikit-learn:
#
#   bash benchmarks/gpu_check.sh            # figures on stdout and under $OUT (default /tmp)
#
# 1. the fused trainer on a packed smoke grid (exactness on the GPU, fast paths) and the fast
#    measure search on one CIFAR-shaped NiN (benchmarks/gpu_smoke.py);
# 2. population throughput at NiN 10x3 in the four modes (one model, four processes, fused
#    K = 4/12/36), eager fp32 and bf16 + channels-last, 3 repeats each;
# 3. the grid's smallest and largest shapes (8x2, 12x4), one model vs fused K = 12, once.
# Each part has its own time limit; a part that fails or runs out says so and the rest runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp}/gpu_check"
mkdir -p "$OUT"

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v "UserWarning\|warnings.warn" | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, sys; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'Python', sys.version.split()[0])"
part smoke 150 python benchmarks/gpu_smoke.py
part population_fp32 150 python benchmarks/population_throughput.py --shapes 10x3 --repeats 3
part population_bf16 120 python benchmarks/population_throughput.py --shapes 10x3 --repeats 3 \
    --modes procs4 fused --amp bf16 --channels-last
part population_shapes 60 python benchmarks/population_throughput.py --shapes 8x2 12x4 \
    --repeats 1 --modes one fused --packs 12
echo "== done in ${SECONDS}s; outputs under $OUT"
