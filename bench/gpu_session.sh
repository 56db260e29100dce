#!/usr/bin/env bash
# One device call (read-only on the GPU; carry wheels/, made by bench/wheels.sh):
#   bash bench/gpu_session.sh MODE
#   x1     - real-NVML tests, the 7B cells of bench/configs/h100x1.yaml, run-cell overhead (3 rounds)
#   x2     - 7B shards 1 vs 2 (both GPUs metered) and run-cell overhead (3 rounds)
#   x4     - 65B shards 4 (bench/configs/h100x4_65b.yaml)
#   probe  - raw NVML trace under decode load (bench/nvml_probe.py), the decode
#            acceptance cell through run-cell, and the in-process overhead bench (pinned);
#   inproc - real-NVML tests, the decode acceptance cell and the in-process
#            overhead bench (20 ABBA rounds, default 40 ms poll, unpinned);
#   accept - real-NVML tests and the run-cell overhead (ABBA, 4 rounds);
#   shards - real-NVML tests and 7B shards 1 vs 2 (both GPUs metered);
#   quick - real-NVML tests, then the compiled engine at fp16/int8/fp8, batch 1 and 16 (~5 min);
#   engines - bench/engines.py: reference vs compiled at batch 1/16/64 (7B, in one process);
#   engcells - the engine axis through run-cell (bench/configs/h200x1_engines.yaml);
#   precision - issue 24's acceptance: bench/engines.py with reference, compiled and hf at
#            fp16 bf16 int8 fp8 (batch 1 and 16);
#   precells - the compiled cells of bench/configs/h200x1_precision.yaml through run-group,
#            set beside that bench's JSON ($BENCH_JSON) by bench/precision_cells.py;
#   fp8 - bench/engines.py fp8 at batch 1, then the fp8 cells of h200x1_precision.yaml through
#            run-group, set beside it;
#   rg1 - bench/engines.py compiled fp16 int8 at batch 1, then the same two cells through
#            run-group, set beside it (one machine);
#   profile - bench/step_profile.py: where a compiled decode step's time goes (kernels per
#            step, busy share, kernel classes, the weight kernels' bandwidth), fp16 int8 fp8;
#   sweep - bench/gemv_sweep.py: narrow_mm's block configs on the 7B shapes at 1 and 16 rows
#            (int8, then the best with fp8), then the decode-step profile (fp16, int8);
#   b1 - the sweep (1 and 16 rows), bench/engines.py compiled fp16 int8 fp8 at batch 1, then
#            the int8 and fp16 batch-1 cells through run-group set beside it (same machine);
#   wide - session 14: bench/gemv_sweep.py --wide (fp16 weights through our one-row GEMV against
#            cuBLAS), then bench/engines.py compiled fp16 int8 at batch 1, fp16 with our GEMV
#            (LLMENERGY_DENSE_GEMV=1) and with cuBLAS, in one call
#   load - session 14: bench/gemv_sweep.py --space load (the int8 GEMV's cache policies), then
#            bench/engines.py compiled fp16 at batch 1 with cuBLAS (the default), then with our
#            GEMV (LLMENERGY_DENSE_GEMV=1), then int8 and fp8, in one call
#   gemv - session 11: the GEMV sweep at one row (the 3-D tile kernel against session 10's in
#            the same process), bench/engines.py compiled fp16 int8 fp8 at batch 1, then the
#            decode-step profile of int8 and fp8 at batch 1;
#   prefill - session 11: the step profile of fp16 and int8 at batch 1 with the prefill's
#            wall time against its kernels' time (int8's prefill was 41-45 ms, fp16's 23-36);
#   rg8 - bench/engines.py fp8 at batch 1, then that cell through run-group (until $END s);
#   ppaths - bench/prefill_paths.py: the prefill eager and compiled (fp16 int8 fp8, batch 1 16);
#   s12 - session 12: bench/prefill_paths.py (fp16 int8, batch 1 16), then bench/engines.py
#            compiled fp16 int8 at batch 1 and the same two cells through run-group beside it;
#   cprefill - session 12: bench/engines.py compiled fp16 int8 at batch 1 with the eager prefill,
#            then fp16 int8 fp8 at batch 1 and 16 with the prefill's block compiled
#            (LLMENERGY_COMPILE_PREFILL=1), in one call;
#   b64 - session 13: bench/engines.py compiled fp16 int8 fp8 at batch 64 (256 generated: issue 17's
#            setting), then compiled fp16 int8 at batch 1 twice more (the ratio's spread);
#   kb - session 13: bench/engines.py compiled fp16 at batch 16 and 64 (256 generated), the decode
#            attending over key lengths (the default), then over the whole cache (LLMENERGY_KEY_BUCKETS=0);
#   acc - session 15's plan for issue 24's "same cells through run-group": bench/engines.py compiled
#            at batch 1 and 16 for the precisions in $ACC (default "fp16 int8"; then ACC="bf16 fp8"),
#            then the same cells of bench/configs/h200x1_acceptance.yaml through run-group on the
#            same machine, set beside it by bench/precision_cells.py (cell.json and metrics kept);
#   order - session 16: the dense fp16 cells through run-group ran 3.5-5 % under the bench that
#            ran before them in the same call (int8/fp8 within 1 %): run-group with no collector
#            (backend none), then as configured, then the bench;
#   dense - session 16's open question (the dense compiled decode ~160 us a step slower through
#            run-group than in bench/engines.py, with or without the collector): fp16 at batch 1
#            in the bench as it is (--batches 1: the model built for batch 1, as the cell's is),
#            with the ranks' OMP_NUM_THREADS=1, with the ranks' NCCL barrier (--barrier), then
#            the batch-1 fp16 cell through run-group, set beside each;
#   rprof - the dense decode step's kernels in the bench's process (bench/step_profile.py fp16
#            batch 1) and in a run-group rank (bench/rank_profile/sitecustomize.py), to compare;
#            RDENSE=1 then runs dense's bench variants (plain, OMP_NUM_THREADS=1, --barrier) while
#            $END allows, each set beside the profiled cell (its measured windows are untouched);
#            RPREC=bf16 does all of it at bf16 instead of fp16 (the cell then also compares its
#            logits with an fp16 load of the same weights: the bf16 fidelity on a GPU);
#   nccl - session 19: the rank's dense step had the bench's kernels and busy time but ~170 us a
#            step more GPU idle, and the bench with a live NCCL communicator (--barrier) ran ~1.5 %
#            under plain: plain/--barrier alternated twice (fp16, batch 1), then the batch-1 fp16
#            cell through run-group; the bench with every prompt 64 tokens (the cell's prefill took
#            25 ms a batch against the bench's 14.6); each run's prefill and decode printed;
#   ncclenv - session 20: which part of a live NCCL communicator costs the ~170 us a CUDA-graph step
#            (fp16, batch 1): plain, --barrier, then --barrier with NCCL's cuMem allocations off
#            (NCCL_CUMEM_ENABLE=0) and with torch's NCCL watchdog extras off (monitoring, async
#            error handling, flight recorder), while $END allows; each run's decode printed;
#   reset - session 20: the batch-16 fp16 cell decoded ~160 us a step slower after the batch-1 cell in
#            the same job (623.4 ms a batch) than alone (603.1, the bench's 602-603): the batch-16
#            group alone, then the [1, 16] group as it is, with one engine for both batch sizes (the
#            KV cache built for batch 16: LLMENERGY_BENCH_FORGET=share), with the rank's forget_compiled
#            a no-op (=keep) and with gc.collect() and empty_cache() around it (=gc), while $END allows
#            ($ARMS picks), through bench/engine_reset/sitecustomize.py; each cell's decode printed.
#            Session 21: the reset was the cost, and the worker now resets only without room, so
#            plain = keep; =reset brings a reset at every swap back (ARMS="alone plain reset")
#   variants - session 22: fp16 compiled at batch 1 (and 16) with the decode's attention on cuDNN (the
#            default), on the efficient kernel, as math (Inductor's own kernels), and with Inductor's
#            coordinate-descent tuning (its GEMV for one row), each in its own process, base again last;
#   integrity - issue 22's acceptance (bench/configs/h200x1_integrity.yaml through run-group,
#            read by bench/integrity.py), then the compiled engine at batch 1 per precision.
set -uo pipefail
mode=${1:-x1}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/pylibs
for w in wheels/*.whl; do python3 -m pip install -q --no-deps --target /tmp/pylibs "$w" 2>/dev/null || true; done
export PYTHONPATH=$PWD/src:/tmp/pylibs
nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpus_$mode.csv"
nproc
step() { local t=$1; shift; echo "== $* (limit ${t}s)"; local s=$SECONDS; timeout "$t" "$@" 2>&1 | tee -a "$OUT/log_$mode.txt" | tail -"${TAIL:-6}"; echo "== rc ${PIPESTATUS[0]} in $((SECONDS - s)) s"; }
nvml_tests() { step 90 python3 -m pytest -q -rP -p no:cacheprovider tests/power/test_nvml_hardware.py; }
cell7b=llama-7b_alpaca_H100_s1_b16_g256_pnone_reference
# the CLI as a command `timeout` can start (a shell function it cannot)
lle=(python3 -c 'import sys; from llmenergy.cli import main; sys.exit(main())')
# bench/engines.py compiled at batch 1 (limit $1 s, precisions $3...), then the int8 and fp16
# cells of h200x1_precision_b1.yaml through run-group until $2 s into the call, set beside it
batch1() {
  local limit=$1 end=$2; shift 2
  TAIL=8 step "$limit" python3 bench/engines.py --engines compiled --precision "$@" --batches 1 \
    --gen 128 --min-window-s 5 --cache-dir /tmp/inductor --out "$OUT/h200_b1.json"
  for g in compiled_int8 compiled; do
    TAIL=3 step $(( end - SECONDS )) "${lle[@]}" run-group --config bench/configs/h200x1_precision_b1.yaml \
      --group llama-7b_H200_s1_pnone_$g
  done
  TAIL=8 step 20 python3 bench/precision_cells.py bench-results/h200x1_precision_b1 "$OUT/h200_b1.json" \
    --out "$OUT/h200_b1_cells.json"
}
case "$mode" in
  x1)
    nvml_tests
    step 200 python3 bench/gpu_cells.py --config bench/configs/h100x1.yaml --out "$OUT/h100x1_cells.json"
    step 300 python3 bench/gpu_cells.py --config bench/configs/h100x1.yaml --runs 3 --overhead $cell7b --out "$OUT/h100x1_overhead.json" ;;
  x2)
    step 200 python3 bench/gpu_cells.py --config bench/configs/h100x2.yaml --out "$OUT/h100x2_cells.json"
    step 300 python3 bench/gpu_cells.py --config bench/configs/h100x2.yaml --runs 3 --overhead $cell7b --out "$OUT/h100x2_overhead.json" ;;
  x4)
    step 500 python3 bench/gpu_cells.py --config bench/configs/h100x4_65b.yaml --out "$OUT/h100x4_65b_cells.json" ;;
  probe)
    step 150 python3 bench/nvml_probe.py --out "$OUT/probe.npz" --batches 6
    step 200 python3 bench/gpu_cells.py --config bench/configs/h100x1_decode.yaml --out "$OUT/decode_cell.json"
    TAIL=3 step 260 python3 bench/collector_overhead.py --rounds 8 --poll-ms 40 20 --pin --out "$OUT/overhead_inproc.json" ;;
  inproc)
    nvml_tests
    step 200 python3 bench/gpu_cells.py --config bench/configs/h100x1_decode.yaml --out "$OUT/decode_cell.json"
    TAIL=3 step 300 python3 bench/collector_overhead.py --rounds 20 --poll-ms 40 --out "$OUT/overhead_inproc.json" ;;
  accept)
    nvml_tests
    step 450 python3 bench/gpu_cells.py --config bench/configs/h100x1.yaml --runs 4 --overhead $cell7b --out "$OUT/overhead_runcell.json" ;;
  shards)
    nvml_tests
    TAIL=2 step 300 python3 bench/gpu_cells.py --config bench/configs/h100x2.yaml --out "$OUT/x2_cells.json" ;;
  engines)
    TAIL=40 step 570 python3 bench/engines.py --out "$OUT/h200_engines.json" --cache-dir /tmp/inductor ;;
  engcells)
    nvml_tests
    TAIL=20 step 500 python3 bench/gpu_cells.py --config bench/configs/h200x1_engines.yaml --out "$OUT/h200_engine_cells.json" ;;
  b64)
    E=(python3 bench/engines.py --engines compiled --min-window-s 5 --cache-dir /tmp/inductor)
    TAIL=10 step 260 "${E[@]}" --precision fp16 int8 fp8 --batches 64 --gen 256 --out "$OUT/h200_b64.json"
    for i in 1 2; do
      TAIL=5 step $(( ${END:-400} - SECONDS )) "${E[@]}" --precision fp16 int8 --batches 1 --gen 128 \
        --out "$OUT/h200_b1_$i.json"
    done ;;
  kb)
    E=(python3 bench/engines.py --engines compiled --min-window-s 5 --cache-dir /tmp/inductor
       --precision fp16 --batches 16 64 --gen 256)
    TAIL=12 step 150 "${E[@]}" --out "$OUT/h200_buckets.json"
    TAIL=12 LLMENERGY_KEY_BUCKETS=0 step $(( ${END:-300} - SECONDS )) "${E[@]}" --out "$OUT/h200_whole.json" ;;
  integrity)
    C=bench/configs/h200x1_integrity.yaml
    TAIL=4 step 230 "${lle[@]}" run-group --config $C --group llama-7b_H200_s1_pnone_compiled
    TAIL=4 step 170 "${lle[@]}" run-group --config $C --group llama-7b_H200_s1_pnone_reference
    TAIL=8 step 30 python3 bench/integrity.py bench-results/h200x1_integrity --out "$OUT/h200_integrity.json"
    TAIL=20 step $(( 585 - SECONDS )) python3 bench/engines.py --engines compiled --precision fp16 int8 fp8 \
      --batches 1 --gen 128 --min-window-s 5 --cache-dir /tmp/inductor --out "$OUT/h200_precision_b1.json" ;;
  variants)
    # session 22: fp16 at batch 1 short of 240 tok/s; the decode step's attention (cuDNN, ~6 us a
    # layer) and its GEMVs (cuBLAS) tried other ways, each in a process of its own, base first
    # and last ($VARIANTS picks; each row's decode time and mean power printed)
    # each variant its own Inductor cache: with one, the attention variants hit the base's cached
    # graph (compiles of 8-14 s, the same decode to 0.1 %), which ignores the backend switches
    E=(python3 bench/engines.py --engines compiled --precision fp16 --gen 128 --min-window-s 5)
    for v in ${VARIANTS:-base efficient math cdt cdtmath base2}; do
      case $v in
        base|base2) A=(--batches 1 16) ;;
        efficient) A=(--batches 1 16 --sdpa-off cudnn) ;;
        math) A=(--batches 1 16 --sdpa-off cudnn efficient flash) ;;
        cdt) A=(--batches 1 --inductor coordinate_descent_tuning=true) ;;
        cdtmath) A=(--batches 1 --inductor coordinate_descent_tuning=true --sdpa-off cudnn efficient flash) ;;
      esac
      left=$(( ${END:-585} - SECONDS )); [ "$left" -gt 60 ] || break
      TAIL=4 step "$left" "${E[@]}" "${A[@]}" --cache-dir "/tmp/inductor_$v" --out "$OUT/h200_variant_$v.json"
    done ;;
  quick)
    # a short call when time on the device is scarce: the NVML hardware tests (the job's own GPU
    # processes), then the compiled engine's precisions at batch 1 and 16 (~5 min)
    nvml_tests
    TAIL=20 step $(( 420 - SECONDS )) python3 bench/engines.py --engines compiled \
      --precision fp16 int8 fp8 --batches 1 16 --gen 128 --min-window-s 5 \
      --cache-dir /tmp/inductor --out "$OUT/quick_compiled.json" ;;
  precision)
    nvml_tests  # also: the rank's own context and its compile workers are not other processes
    TAIL=45 step $(( 590 - SECONDS )) python3 bench/engines.py --engines reference compiled hf \
      --precision fp16 bf16 int8 fp8 --batches 1 16 --gen 128 --min-window-s 5 \
      --cache-dir /tmp/inductor --out "$OUT/h200_precision_all.json" ;;
  acc)
    read -r -a P <<< "${ACC:-fp16 int8}"
    tag=$(IFS=_; echo "${P[*]}")
    TAIL=10 step 300 python3 bench/engines.py --engines compiled --precision "${P[@]}" --batches 1 16 \
      --gen 128 --min-window-s 5 --cache-dir /tmp/inductor --out "$OUT/h200_acc_$tag.json"
    # the comparison and the cells' files after each job, not once at the end: session 22's call
    # ran out of time in the last job and lost the three cells finished before it
    for p in "${P[@]}"; do
      g=llama-7b_H200_s1_pnone_compiled; [ "$p" = fp16 ] || g=${g}_$p
      TAIL=3 step $(( ${END:-570} - SECONDS )) "${lle[@]}" run-group --config bench/configs/h200x1_acceptance.yaml --group "$g"
      TAIL=14 step 20 python3 bench/precision_cells.py bench-results/h200x1_acceptance "$OUT/h200_acc_$tag.json" \
        --out "$OUT/h200_acc_${tag}_cells.json"
      for d in bench-results/h200x1_acceptance/cells/*/; do
        mkdir -p "$OUT/cells_$tag/$(basename "$d")" && cp "$d"cell.json "$d"spec.json "$d"metrics.parquet "$d"events.parquet "$d"power.parquet "$d"responses.parquet "$OUT/cells_$tag/$(basename "$d")/" 2>/dev/null
      done
    done
    # each job's engines: kept or built after a reset, and the GPU memory beside them (session 21)
    grep -h "of this process built\|compiled code of the job" bench-results/h200x1_acceptance/groups/*/logs/rank0.log \
      | cut -c1-200 ;;
  order)
    C=bench/configs/h200x1_acceptance.yaml; g=llama-7b_H200_s1_pnone_compiled
    rm -rf bench-results
    # the fp16 group with no collector process (backend none: tokens/s only), then as configured
    sed -e 's/backend: nvml/backend: none/' -e 's#h200x1_acceptance#nocollector#' $C > /tmp/nocollector.yaml
    TAIL=3 step 150 "${lle[@]}" run-group --config /tmp/nocollector.yaml --group $g
    TAIL=3 step 150 "${lle[@]}" run-group --config $C --group $g
    TAIL=4 step $(( ${END:-480} - SECONDS )) python3 bench/engines.py --engines compiled --precision fp16 \
      --batches 1 16 --gen 128 --min-window-s 5 --cache-dir /tmp/inductor --out "$OUT/h200_fp16.json"
    for d in nocollector h200x1_acceptance; do
      TAIL=4 step 20 python3 bench/precision_cells.py bench-results/$d "$OUT/h200_fp16.json" --out "$OUT/cells_$d.json"
    done ;;
  dense)
    E=(python3 bench/engines.py --engines compiled --precision fp16 --batches 1 --gen 128 --min-window-s 5
       --cache-dir /tmp/inductor)
    TAIL=3 step 120 "${E[@]}" --out "$OUT/h200_plain.json"
    TAIL=3 step 90 env OMP_NUM_THREADS=1 "${E[@]}" --out "$OUT/h200_omp1.json"
    TAIL=3 step 90 "${E[@]}" --barrier --out "$OUT/h200_barrier.json"
    sed -e 's/batch_size: \[1, 16\]/batch_size: [1]/' -e 's/precision: \[.*\]/precision: [fp16]/' \
      bench/configs/h200x1_acceptance.yaml > /tmp/dense.yaml
    TAIL=3 step $(( ${END:-420} - SECONDS )) "${lle[@]}" run-group --config /tmp/dense.yaml \
      --group llama-7b_H200_s1_pnone_compiled
    for b in plain omp1 barrier; do
      TAIL=2 step 20 python3 bench/precision_cells.py bench-results/h200x1_acceptance "$OUT/h200_$b.json" \
        --out "$OUT/cells_$b.json"
    done ;;
  rprof)
    env | grep -E '^(TORCH|CUDA|CUBLAS|NCCL|OMP|PYTORCH|MKL|TRITON|LLMENERGY)' > "$OUT/env_bench.txt"
    python3 -c 'import torch; print(torch.backends.cuda.preferred_blas_library(), torch.get_num_threads())' >> "$OUT/env_bench.txt"
    rp=${RPREC:-fp16}; g=llama-7b_H200_s1_pnone_compiled; [ "$rp" = fp16 ] || g=${g}_$rp
    TAIL=6 step 150 python3 bench/step_profile.py --precision "$rp" --batches 1 --out "$OUT/h200_bench_profile.json"
    sed -e 's/batch_size: \[1, 16\]/batch_size: [1]/' -e "s/precision: \[.*\]/precision: [$rp]/" \
      -e 's#h200x1_acceptance#rank_profile#' bench/configs/h200x1_acceptance.yaml > /tmp/rprof.yaml
    TAIL=3 step $(( ${END:-330} - SECONDS )) env PYTHONPATH="$PWD/bench/rank_profile:$PYTHONPATH" \
      LLMENERGY_BENCH_PROFILE="$OUT/h200_rank_profile.json" "${lle[@]}" run-group --config /tmp/rprof.yaml \
      --group "$g"
    python3 -c 'import json, sys; [print(p, json.load(open(p)).get("fidelity")) for p in sys.argv[1:]]' \
      bench-results/rank_profile/cells/*/cell.json
    python3 - "$OUT" <<'PY'
import json, sys
for name in ("bench", "rank"):
    try:
        r = json.load(open(f"{sys.argv[1]}/h200_{name}_profile.json"))["runs"][0]
    except (OSError, KeyError, IndexError) as exc:
        print(name, "no profile:", exc); continue
    d = json.load(open(f"{sys.argv[1]}/h200_{name}_profile.json"))
    print(name, {k: d[k] for k in ("blas", "threads", "env") if k in d})
    print(f"{name}: step {r['step_s'] * 1e3:.3f} ms, {r['kernels_per_step']:.1f} kernels/step, busy {r['kernel_busy_s_per_step'] * 1e3:.3f} ms")
    for k, us in r["top_kernels_us_per_step"][:8]:
        print(f"   {us:8.1f} us  {k}")
PY
    # RDENSE=1: then dense's bench variants, each set beside the profiled cell, while $END allows
    if [ "${RDENSE:-0}" = 1 ]; then
      E=(python3 bench/engines.py --engines compiled --precision "$rp" --batches 1 --gen 128 --min-window-s 5
         --cache-dir /tmp/inductor)
      for b in plain omp1 barrier; do
        left=$(( ${END:-540} - SECONDS )); [ "$left" -gt 60 ] || break
        case $b in
          plain) TAIL=3 step "$left" "${E[@]}" --out "$OUT/h200_$b.json" ;;
          omp1) TAIL=3 step "$left" env OMP_NUM_THREADS=1 "${E[@]}" --out "$OUT/h200_$b.json" ;;
          barrier) TAIL=3 step "$left" "${E[@]}" --barrier --out "$OUT/h200_$b.json" ;;
        esac
        TAIL=2 step 20 python3 bench/precision_cells.py bench-results/rank_profile "$OUT/h200_$b.json" \
          --out "$OUT/cells_$b.json"
      done
    fi
    ;;
  nccl)
    E=(python3 bench/engines.py --engines compiled --precision fp16 --batches 1 --gen 128 --min-window-s 5
       --cache-dir /tmp/inductor)
    TAIL=2 step 120 "${E[@]}" --out "$OUT/h200_plain1.json"
    TAIL=2 step 90 "${E[@]}" --barrier --out "$OUT/h200_barrier1.json"
    TAIL=2 step 90 "${E[@]}" --out "$OUT/h200_plain2.json"
    TAIL=2 step 90 "${E[@]}" --barrier --out "$OUT/h200_barrier2.json"
    TAIL=2 step 90 "${E[@]}" --shortest-prompt 64 --out "$OUT/h200_prompt64.json"  # the cell's prompt lengths
    sed -e 's/batch_size: \[1, 16\]/batch_size: [1]/' -e 's/precision: \[.*\]/precision: [fp16]/' \
      -e 's#h200x1_acceptance#nccl#' bench/configs/h200x1_acceptance.yaml > /tmp/nccl.yaml
    TAIL=2 step $(( ${END:-420} - SECONDS )) "${lle[@]}" run-group --config /tmp/nccl.yaml \
      --group llama-7b_H200_s1_pnone_compiled
    python3 bench/decode_table.py --cells bench-results/nccl --bench \
      $(for b in plain1 barrier1 plain2 barrier2 prompt64; do echo "$b=$OUT/h200_$b.json"; done)
    rm -rf bench-results/nccl/.cache ;;
  ncclenv)
    E=(python3 bench/engines.py --engines compiled --precision fp16 --batches 1 --gen 128 --min-window-s 5
       --cache-dir /tmp/inductor)
    TAIL=2 step 120 "${E[@]}" --out "$OUT/h200_plain.json"
    TAIL=2 step 90 "${E[@]}" --barrier --out "$OUT/h200_barrier.json"
    TAIL=2 step 90 env NCCL_CUMEM_ENABLE=0 "${E[@]}" --barrier --out "$OUT/h200_nocumem.json"
    TAIL=2 step $(( ${END:-400} - SECONDS )) env TORCH_NCCL_ENABLE_MONITORING=0 TORCH_NCCL_ASYNC_ERROR_HANDLING=0 \
      TORCH_NCCL_TRACE_BUFFER_SIZE=0 "${E[@]}" --barrier --out "$OUT/h200_nowatch.json"
    python3 bench/decode_table.py --bench \
      $(for b in plain barrier nocumem nowatch; do echo "$b=$OUT/h200_$b.json"; done) ;;
  reset)
    sed -e 's/precision: \[.*\]/precision: [fp16]/' -e 's#h200x1_acceptance#reset_#' \
      bench/configs/h200x1_acceptance.yaml > /tmp/reset.yaml
    for arm in ${ARMS:-alone plain share keep gc}; do
      left=$(( ${END:-585} - SECONDS )); [ "$left" -gt $([ $arm = alone ] && echo 70 || echo 125) ] || break
      sed -e "s#reset_#reset_$arm#" /tmp/reset.yaml > /tmp/reset_$arm.yaml
      [ $arm = alone ] && sed -i 's/batch_size: \[1, 16\]/batch_size: [16]/' /tmp/reset_$arm.yaml
      TAIL=2 step "$left" env PYTHONPATH="$PWD/bench/engine_reset:$PYTHONPATH" LLMENERGY_BENCH_FORGET=$arm \
        "${lle[@]}" run-group --config /tmp/reset_$arm.yaml --group llama-7b_H200_s1_pnone_compiled
    done
    python3 bench/decode_table.py --cells bench-results/reset_*
    grep -H "engine_reset" bench-results/reset_*/groups/*/logs/rank0.log | cut -c1-160 ;;
  precells)
    C=bench/configs/h200x1_precision.yaml
    for g in compiled_int8 compiled compiled_fp8; do
      TAIL=3 step $(( 560 - SECONDS )) "${lle[@]}" run-group --config $C --group llama-7b_H200_s1_pnone_$g
    done
    TAIL=12 step 20 python3 bench/precision_cells.py bench-results/h200x1_precision \
      "${BENCH_JSON:-bench/results/session14/precision/h200_precision_all.json}" --out "$OUT/h200_precision_cells.json" ;;
  fp8)
    # the fp8 cells through run-group beside bench/engines.py at batch 1 in the same call
    # (session 9: the fp16 prefill overflow fix, the kernel variants compiled in the warm-up)
    C=bench/configs/h200x1_precision.yaml
    TAIL=6 step 120 python3 bench/engines.py --engines compiled --precision fp8 --batches 1 --gen 128 \
      --min-window-s 5 --cache-dir /tmp/inductor --out "$OUT/h200_fp8_b1.json"
    TAIL=3 step 240 "${lle[@]}" run-group --config $C --group llama-7b_H200_s1_pnone_compiled_fp8
    TAIL=12 step 20 python3 bench/precision_cells.py bench-results/h200x1_precision "$OUT/h200_fp8_b1.json" \
      --out "$OUT/h200_fp8_cells.json" ;;
  sweep)
    TAIL=40 step 330 python3 bench/gemv_sweep.py --budget-s 100 --out "$OUT/h200_gemv_sweep.json"
    TAIL=12 step $(( 570 - SECONDS )) python3 bench/step_profile.py --precision fp16 int8 --batches 1 16 \
      --out "$OUT/h200_step_profile.json" ;;
  b1)
    TAIL=24 step 110 python3 bench/gemv_sweep.py --budget-s 40 --fp8-top 4 --out "$OUT/h200_gemv_sweep.json"
    batch1 280 565 fp16 int8 fp8 ;;
  rg1)
    batch1 200 "${END:-555}" fp16 int8 ;;
  load)
    TAIL=30 step 200 python3 bench/gemv_sweep.py --rows 1 --space load --budget-s 110 --fp8-top 4 \
      --out "$OUT/h200_load_sweep.json"
    E=(python3 bench/engines.py --engines compiled --batches 1 --gen 128 --min-window-s 5 --cache-dir /tmp/inductor)
    TAIL=8 step 150 "${E[@]}" --precision fp16 --out "$OUT/h200_b1_cublas.json"
    TAIL=8 LLMENERGY_DENSE_GEMV=1 step 150 "${E[@]}" --precision fp16 --out "$OUT/h200_b1_gemv.json"
    TAIL=12 step $(( ${END:-560} - SECONDS )) "${E[@]}" --precision int8 fp8 --out "$OUT/h200_b1_narrow.json" ;;
  wide)
    TAIL=30 step 200 python3 bench/gemv_sweep.py --wide --budget-s 100 --out "$OUT/h200_wide_gemv.json"
    E=(python3 bench/engines.py --engines compiled --batches 1 --gen 128 --min-window-s 5 --cache-dir /tmp/inductor)
    TAIL=12 LLMENERGY_DENSE_GEMV=1 step 230 "${E[@]}" --precision fp16 int8 --out "$OUT/h200_b1_gemv.json"
    TAIL=8 LLMENERGY_DENSE_GEMV=0 step $(( ${END:-560} - SECONDS )) "${E[@]}" --precision fp16 --out "$OUT/h200_b1_cublas.json" ;;
  gemv)
    TAIL=30 step 170 python3 bench/gemv_sweep.py --rows 1 --budget-s 90 --fp8-top 6 \
      --out "$OUT/h200_gemv_sweep.json"
    TAIL=10 step 250 python3 bench/engines.py --engines compiled --precision fp16 int8 fp8 \
      --batches 1 --gen 128 --min-window-s 5 --cache-dir /tmp/inductor --out "$OUT/h200_b1.json"
    TAIL=12 step $(( 580 - SECONDS )) python3 bench/step_profile.py --precision int8 fp8 \
      --batches 1 --out "$OUT/h200_step_profile.json" ;;
  prefill)
    TAIL=12 step $(( 340 - SECONDS )) python3 bench/step_profile.py --precision fp16 int8 --batches 1 \
      --steps 10 --out "$OUT/h200_prefill_profile.json" ;;
  rg8)
    # fp8 at batch 1: the bench, then the same cell through run-group, set beside it
    TAIL=6 step 100 python3 bench/engines.py --engines compiled --precision fp8 --batches 1 --gen 128 \
      --min-window-s 5 --cache-dir /tmp/inductor --out "$OUT/h200_b1.json"
    TAIL=3 step $(( ${END:-300} - SECONDS )) "${lle[@]}" run-group --config bench/configs/h200x1_precision_b1.yaml \
      --group llama-7b_H200_s1_pnone_compiled_fp8
    TAIL=8 step 15 python3 bench/precision_cells.py bench-results/h200x1_precision_b1 "$OUT/h200_b1.json" \
      --out "$OUT/h200_b1_cells.json" ;;
  cprefill)
    TAIL=10 step 200 env LLMENERGY_COMPILE_PREFILL=0 python3 bench/engines.py --engines compiled \
      --precision fp16 int8 --batches 1 --gen 128 --min-window-s 5 --cache-dir /tmp/inductor \
      --out "$OUT/h200_eager_prefill.json"
    TAIL=20 step $(( 585 - SECONDS )) env LLMENERGY_COMPILE_PREFILL=1 python3 bench/engines.py \
      --engines compiled --precision fp16 int8 fp8 --batches 1 16 --gen 128 --min-window-s 5 \
      --cache-dir /tmp/inductor --out "$OUT/h200_compiled_prefill.json" ;;
  ppaths)
    TAIL=30 step 200 python3 bench/prefill_paths.py --out "$OUT/h200_prefill_paths.json" ;;
  s12)
    TAIL=8 step 120 python3 bench/prefill_paths.py --precision fp16 int8 --reps 10 \
      --out "$OUT/h200_prefill_paths.json"
    batch1 220 585 fp16 int8 ;;
  profile)
    TAIL=20 step 500 python3 bench/step_profile.py --precision fp16 int8 fp8 --batches 1 16 \
      --out "$OUT/h200_step_profile.json" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
if [ -d bench-results ]; then tar czf "$OUT/cells_$mode.tgz" bench-results; fi
