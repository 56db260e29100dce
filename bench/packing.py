"""Packing, measured (issue 18): jobs, model loads and load GPU-hours, packed against unpacked.

    python bench/packing.py                       # default config + a generated 10,000-cell config
    python bench/packing.py --smk                 # also `snakemake -n --profile profiles/slurm`: time, peak RSS
    python bench/packing.py --gpu bench/configs/h200x1_packing.yaml --out OUT.json
    python bench/packing.py --gpu bench/configs/cpu_packing_smoke.yaml   # the same on CPU (tiny model)

Planning part: for each config, the number of Slurm jobs and model loads (one
per job), and the planned GPU-hours spent loading (the load part of each job's
estimate × its GPUs), with ``packing: cell`` and ``packing: group``; the time
of ``llmenergy plan``; with ``--smk``, the wall time and peak memory of
``snakemake -n`` (packed, and unpacked unless ``--no-unpacked``).

GPU part (``--gpu CONFIG``, every cell of the config in one group): the cells
run once packed (``llmenergy run-group``, one model load) and once unpacked
(``llmenergy run-cell`` each), in fresh output directories. For each: the wall
time, and, where NVML answers, the GPU energy of the whole run (the counter of
every GPU the ranks used, read before and after) against the energy of the
measured phases (prefill + decode, from the cells' metrics); the difference is
the energy spent outside the measured phases (process start, CUDA init, model
loads, idle baselines, warm-ups). Read-only on the GPU.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from llmenergy import config, entrypoints
from llmenergy.planning.groups import make_groups
from llmenergy.planning.matrix import estimate_load_s, expand

REPO = Path(__file__).resolve().parents[1]


def generated_config(n_target: int = 10_000) -> dict[str, Any]:
    """A sweep of about ``n_target`` feasible cells (the default config's models and GPUs)."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["repeats"] = 1
    batch = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    gen = [64, 128, 192, 256, 384, 512, 768, 1024]
    cfg["matrix"] = [{"model": sorted(cfg["models"]), "dataset": sorted(cfg["datasets"]),
                      "gpu": sorted(cfg["gpus"]), "shards": [1, 2, 4, 8, 16, 32],
                      "batch_size": batch, "max_gen_len": gen, "power_cap_w": [None]}]
    cfg["output_dir"] = "results"
    for ds in cfg["datasets"].values():
        ds["path"] = "synthetic"
    n = len(expand(config.from_dict(cfg, source="generated.yaml", check_files=False)).cells)
    caps = [None, 250, 200, 175]
    k = max(1, min(len(caps), round(n_target / max(1, n))))
    cfg["matrix"][0]["power_cap_w"] = caps[:k]
    return cfg


def planning(cfg_path: Path) -> dict[str, Any]:
    cfg = config.load(cfg_path, check_files=False)
    cells = expand(cfg).cells
    groups = make_groups(cells)

    def load_gpu_h(cs: list[Any]) -> float:
        return sum(estimate_load_s(cfg, c) * c.shards for c in cs) / 3600

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", entrypoints.CLI, "plan", "--config", str(cfg_path)],
                          capture_output=True, text=True, check=True)
    plan_s = time.perf_counter() - t0
    return {"config": str(cfg_path), "cells": len(cells), "plan_s": round(plan_s, 2),
            "plan_lines": len(proc.stdout.splitlines()),
            "unpacked": {"jobs": len(cells), "model_loads": len(cells), "load_gpu_hours": round(load_gpu_h(cells), 1)},
            "packed": {"jobs": len(groups), "model_loads": len(groups),
                       "max_cells_per_job": max(len(g.cells) for g in groups),
                       "load_gpu_hours": round(load_gpu_h([g.first for g in groups]), 1)}}


def snakemake_dry_run(cfg_path: Path, packing: str) -> dict[str, Any]:
    """Wall time and peak RSS of ``snakemake -n --profile profiles/slurm`` (``/usr/bin/time``)."""
    work = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    try:
        extra = ["--config", "packing=cell"] if packing == "cell" else []
        cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "snakemake", "-n", "--snakefile",
               str(REPO / "Snakefile"), "--profile", str(REPO / "profiles" / "slurm"), "--directory", str(work),
               "--configfile", str(cfg_path.resolve()), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        m = re.search(r"TIME ([\d.]+) (\d+)", proc.stderr)
        jobs = re.search(r"^(run_cell|run_group)\s+(\d+)", proc.stdout + proc.stderr, re.M)
        return {"packing": packing, "rc": proc.returncode, "wall_s": float(m.group(1)) if m else None,
                "peak_rss_mb": round(int(m.group(2)) / 1024) if m else None,
                "jobs": int(jobs.group(2)) if jobs else None}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- #
# GPU part
# --------------------------------------------------------------------------- #

def _nvml_energy_mj() -> dict[str, int] | None:
    """``{uuid: total energy counter, mJ}`` of every GPU, or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML: no energy figure
        return None
    try:
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            out[uuid.decode() if isinstance(uuid, bytes) else str(uuid)] = int(
                pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
        return out
    finally:
        pynvml.nvmlShutdown()


def _run_mode(cfg_path: Path, mode: str, root: Path) -> dict[str, Any]:
    import pandas as pd

    work = root / mode
    work.mkdir(parents=True)
    data = yaml.safe_load(cfg_path.read_text())
    data["output_dir"] = "results"
    (work / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = config.load(work / "config.yaml", check_files=False)
    cells = expand(cfg).cells
    groups = make_groups(cells)
    if len(groups) != 1:
        raise SystemExit(f"{cfg_path}: {len(groups)} groups; the GPU bench wants one group")
    base = [sys.executable, "-m", entrypoints.CLI]
    commands = ([[*base, "run-group", "--config", "config.yaml", "--group", groups[0].id]] if mode == "packed"
                else [[*base, "run-cell", "--config", "config.yaml", "--cell", c.id] for c in cells])
    before = _nvml_energy_mj()
    t0 = time.perf_counter()
    codes = [subprocess.run(cmd, cwd=work, check=False).returncode for cmd in commands]
    wall_s = time.perf_counter() - t0
    after = _nvml_energy_mj()
    metrics = pd.concat([pd.read_parquet(c.dir(work / "results") / "metrics.parquet") for c in cells
                         if (c.dir(work / "results") / "metrics.parquet").exists()])
    measured_j = float(metrics[["prefill_energy_j", "decode_energy_j"]].sum().sum())
    used = {g["uuid"] for c in cells for g in json.loads((c.dir(work / "results") / "cell.json").read_text())
            ["provenance"]["gpus"]} if codes and all(code == 0 for code in codes) else set()
    total_j = None
    if before is not None and after is not None:
        keys = [u for u in after if u in used] or list(after)
        total_j = sum(after[u] - before[u] for u in keys) / 1000
    return {"mode": mode, "jobs": len(commands), "exit_codes": codes, "wall_s": round(wall_s, 1),
            "cells": len(cells), "tokens_out": int(metrics["tokens_out"].sum()),
            "gpu_energy_total_j": None if total_j is None else round(total_j, 1),
            "measured_phases_j": round(measured_j, 1),
            "outside_measured_j": None if total_j is None else round(total_j - measured_j, 1),
            "power_source": sorted(set(metrics["power_source"].dropna()))}


def gpu_bench(cfg_path: Path, keep: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-packing-gpu-"))
    try:
        return {"config": str(cfg_path), "runs": [_run_mode(cfg_path, m, root) for m in ("packed", "unpacked")],
                "workdir": str(root) if keep else None}
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=10_000, help="size of the generated config")
    p.add_argument("--smk", action="store_true", help="also time `snakemake -n` (packed and unpacked)")
    p.add_argument("--no-unpacked", action="store_true", help="with --smk: skip the unpacked dry run")
    p.add_argument("--gpu", type=Path, default=None, help="run this one-group config packed and unpacked")
    p.add_argument("--keep", action="store_true", help="keep the GPU part's working directories")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = p.parse_args(argv)
    if args.gpu is not None:
        result: dict[str, Any] = gpu_bench(args.gpu, args.keep)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench-packing-cfg-"))
        generated = tmp / "config-10k.yaml"
        generated.write_text(yaml.safe_dump(generated_config(args.cells), sort_keys=False))
        result = {"configs": []}
        for path in (REPO / "config.yaml", generated):
            entry = planning(path)
            if args.smk:
                entry["snakemake_n"] = [snakemake_dry_run(path, "group")]
                if not args.no_unpacked:
                    entry["snakemake_n"].append(snakemake_dry_run(path, "cell"))
            result["configs"].append(entry)
            print(json.dumps(entry), flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
