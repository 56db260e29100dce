#!/usr/bin/env bash
# One device call: real-NVML tests, GPU cells and the collector-overhead bench.
#   bash bench/gpu_session.sh x1|x2|x4   (on a lent GPU machine; carry wheels/)
set -euo pipefail
kind=${1:-x1}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/pylibs
python3 -m pip install -q --no-deps --target /tmp/pylibs wheels/*.whl
export PYTHONPATH=$PWD/src:/tmp/pylibs
nvidia-smi --query-gpu=name,uuid,driver_version,power.limit --format=csv | tee "$OUT/gpus_$kind.csv"
if [ "$kind" = x1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/collector/test_nvml_hardware.py 2>&1 | tail -3 | tee "$OUT/nvml_tests.txt"
  python3 bench/gpu_cells.py --config bench/configs/h100x1.yaml --out "$OUT/h100x1_cells.json"
  python3 bench/gpu_cells.py --config bench/configs/h100x1.yaml --runs 3 \
    --overhead llama-7b_alpaca_H100_s1_b16_g256_pnone_reference --out "$OUT/h100x1_overhead.json"
elif [ "$kind" = x4 ]; then
  python3 bench/gpu_cells.py --config bench/configs/h100x4_65b.yaml --out "$OUT/h100x4_65b_cells.json"
else
  python3 bench/gpu_cells.py --config bench/configs/h100x2.yaml --out "$OUT/h100x2_cells.json"
  python3 bench/gpu_cells.py --config bench/configs/h100x2.yaml --runs 3 \
    --overhead llama-7b_alpaca_H100_s1_b16_g256_pnone_reference --out "$OUT/h100x2_overhead.json"
fi
tar czf "$OUT/results_$kind.tgz" bench-results
