#!/usr/bin/env bash
# One device call for the collector issue on one H100 (read-only on the GPU):
#   probe  - raw NVML trace under decode load (bench/nvml_probe.py), the decode
#            acceptance cell through run-cell, and the in-process overhead bench;
#   inproc - real-NVML tests, the decode acceptance cell and the in-process
#            overhead bench (20 ABBA rounds, default 40 ms poll, unpinned);
#   accept - real-NVML tests and the run-cell overhead (ABBA, 4 rounds);
#   x2     - real-NVML tests and 7B shards 1 vs 2 (both GPUs metered).
#   bash bench/gpu_session_collector.sh probe|accept   (carry wheels/)
set -uo pipefail
mode=${1:-probe}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/pylibs
python3 -m pip install -q --no-deps --target /tmp/pylibs wheels/*.whl
export PYTHONPATH=$PWD/src:/tmp/pylibs
nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpus.csv"
nproc
step() { local t=$1; shift; echo "== $* (limit ${t}s)"; local s=$SECONDS; timeout "$t" "$@" 2>&1 | tail -${TAIL:-6}; echo "== rc ${PIPESTATUS[0]} in $((SECONDS - s)) s"; }
if [ "$mode" = probe ]; then
  step 150 python3 bench/nvml_probe.py --out "$OUT/probe.npz" --batches 6
  step 200 python3 bench/gpu_cells.py --config bench/configs/h100x1_decode.yaml --out "$OUT/decode_cell.json"
  TAIL=3 step 260 python3 bench/collector_overhead.py --rounds 8 --poll-ms 40 20 --pin --out "$OUT/overhead_inproc.json"
elif [ "$mode" = inproc ]; then
  step 60 python3 -m pytest -q -p no:cacheprovider tests/collector/test_nvml_hardware.py
  step 200 python3 bench/gpu_cells.py --config bench/configs/h100x1_decode.yaml --out "$OUT/decode_cell.json"
  TAIL=3 step 300 python3 bench/collector_overhead.py --rounds 20 --poll-ms 40 --out "$OUT/overhead_inproc.json"
elif [ "$mode" = x2 ]; then
  step 60 python3 -m pytest -q -p no:cacheprovider tests/collector/test_nvml_hardware.py
  TAIL=2 step 300 python3 bench/gpu_cells.py --config bench/configs/h100x2.yaml --out "$OUT/x2_cells.json"
else
  step 60 python3 -m pytest -q -p no:cacheprovider tests/collector/test_nvml_hardware.py
  step 400 python3 bench/gpu_cells.py --config bench/configs/h100x1.yaml --runs 4 \
    --overhead llama-7b_alpaca_H100_s1_b16_g256_pnone_reference --out "$OUT/overhead_runcell.json"
fi
tar czf "$OUT/cells.tgz" bench-results
