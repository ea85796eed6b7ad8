#!/usr/bin/env bash
# Every GPU check in one run of a few minutes (docs/speed.md §7): the CUDA tests, then pearl.bench and
# the batched-TLP benchmark on CUDA in fp16 (the released precision on a GPU). Each step has its own
# time limit and writes as it goes, so a step cut short keeps what it finished. Output: $OUT (on the
# device machine) or benchmarks/cuda-run/.
#     bash benchmarks/gpu_wheels.sh                       # here, once: the packages the GPU image lacks
#     device run: bash benchmarks/gpu_check.sh  (carry .whl, timeout_s 560)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/cuda-run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/device.txt"
timeout 150 python3 -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.log"
timeout 270 python3 -m pearl.bench --device cuda --precision fp16 --out "$out/cuda_fp16.csv" 2>&1 \
    | tee "$out/bench_fp16.log"
timeout 60 python3 benchmarks/bench_tlp_batch.py --device cuda --precision fp16 2>&1 | tee "$out/tlp_batch.log"
