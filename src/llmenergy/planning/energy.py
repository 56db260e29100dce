"""The GPU energy a plan will use: its GPU-hours times a power per GPU.

The power per GPU of a (GPU type, engine) comes from the finished cells in the
output directory when there are some: their measured energy over their measured
GPU time (``sum energy_j / sum duration_s × n_devices``, rows with status ``ok``
whose energy is from a GPU sensor, NVML or DCGM). Otherwise it is a prior: the
GPU type's ``tdp_w`` (its power limit) times the utilisation of
:data:`PRIOR_UTILISATION` for the engine. A GPU type without ``tdp_w`` and without
measurements gets no estimate, and the plan says so.

The prior is read from our H200 measurements (docs/design facts, 7B, batch
1/16/64): the ``reference`` engine drew 25–44% of the 700 W limit, ``hf`` 49–79%,
``compiled`` 65–97%. The plan's GPU-hours include model loading and idle
baselines, which draw less, so the estimate leans high.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmenergy.config import Config
from llmenergy.layout import RunLayout

log = logging.getLogger(__name__)

#: engine -> share of the GPU's power limit drawn while a cell runs (the prior)
PRIOR_UTILISATION = {"reference": 0.35, "hf": 0.6, "compiled": 0.8}
#: power sources whose energy is the GPU's own (``power_source`` of a metrics row)
GPU_SENSORS = {"nvml", "nvml-avg", "dcgm"}  # nvml-avg: the counter is the same; only power_w is averaged
#: The plan prints :meth:`EnergyEstimate.text` after "  GPU energy: " on a line of ≤ 120 columns.
TEXT_WIDTH = 120 - len("  GPU energy: ")
_COLUMNS = ["gpu", "engine", "status", "energy_j", "duration_s", "n_devices", "power_source"]


@dataclass(frozen=True)
class EnergyEstimate:
    """The plan's GPU energy and where its powers came from."""

    kwh: float
    measured_gpu_hours: float  # GPU-hours priced at a measured power
    prior_gpu_hours: float  # GPU-hours priced at the prior
    missing_gpu_hours: float  # GPU-hours of types with neither (no tdp_w)
    n_measured_rows: int  # finished repeats the measured powers come from
    source: Path | None  # the summary or cells folder read, None if nothing was found
    missing_types: tuple[str, ...] = ()
    prior_engines: tuple[str, ...] = ()  # engines priced at the prior
    output_dir: str = "results"

    def prior_text(self) -> str:
        return "prior: gpus.<type>.tdp_w × " + ", ".join(f"{PRIOR_UTILISATION.get(e, 1.0):g} ({e})"
                                                         for e in self.prior_engines)

    def text(self, width: int = TEXT_WIDTH) -> str:
        """One line for the plan, at most ``width`` characters where a shorter wording fits.

        GPU-hours that could not be priced (a type with neither measurements nor ``tdp_w``)
        are never counted as 0 kWh: with nothing priced the energy is unknown, otherwise
        the line says which hours its figure leaves out."""
        priced_h = self.measured_gpu_hours + self.prior_gpu_hours
        if not priced_h and not self.missing_gpu_hours:
            return "0 kWh (no GPU-hours planned)"
        types = ", ".join(self.missing_types)
        keys = ", ".join(f"gpus.{t}.tdp_w" for t in self.missing_types)
        if not priced_h:
            return _first_fitting(width, [
                f"unknown (no measured {types} cells in {self.output_dir}/; set {keys} for a prior)",
                f"unknown (no measured {types} cells; set {keys} for a prior)",
                f"unknown (no measured cells; set gpus.<type>.tdp_w for {types} for a prior)",
                "unknown (no measured cells; set gpus.<type>.tdp_w for a prior)"])
        share = f"{self.measured_gpu_hours / priced_h:.0%}"
        n = self.n_measured_rows
        if self.measured_gpu_hours and self.prior_gpu_hours:
            hows = [f"{share} of GPU-hours at the power of {n} measured repeats, the rest {self.prior_text()}",
                    f"{share} of GPU-hours at the power of {n} measured repeats, the rest prior",
                    f"{share} of GPU-hours measured, the rest prior"]
        elif self.measured_gpu_hours:
            hows = ([f"at the power of {n} measured repeats in {self.source}",
                     f"at the power of {n} measured repeats in …/{self.source.name}"] if self.source else [])
            hows += [f"at the power of {n} measured repeats", "measured power"]
        else:
            hows = [f"no measured cells in {self.output_dir}/, so {self.prior_text()}",
                    f"no measured cells, so {self.prior_text()}", "no measured cells, so prior"]
        head = f"{_sig2(self.kwh)} kWh (estimate; "
        tails = [")"]
        if self.missing_types:
            hours = _sig2(self.missing_gpu_hours)
            tails = [f"); without {hours} GPU-hours of {types}: set {keys}",
                     f"); without {hours} GPU-hours of {types} (no tdp_w)",
                     f"); without {hours} GPU-hours (no tdp_w)"]
        return _first_fitting(width, [head + how + tail for tail in tails for how in hows])


def _first_fitting(width: int, candidates: list[str]) -> str:
    """The first of ``candidates`` (most to least detailed) of at most ``width`` characters, else the last."""
    return next((c for c in candidates if len(c) <= width), candidates[-1])


def _sig2(x: float) -> str:
    """``x`` to the unit from 10 up (``1,234``), else to 2 significant digits (``2.5``, ``0.031``)."""
    if x <= 0:
        return "0"
    rounded = float(f"{x:.2g}")
    if rounded >= 10:
        return f"{x:,.0f}"
    return f"{rounded:.{max(1, 1 - math.floor(math.log10(rounded)))}f}"


def _read_rows(output_dir: Path) -> tuple[list[dict[str, Any]], Path | None]:
    """The metrics rows of the output directory: ``summary.parquet``, else every cell's
    ``metrics.parquet``; unreadable files are skipped with a warning."""
    run = RunLayout(output_dir)
    files = ([run.summary] if run.summary.is_file()
             else sorted(f for f in (run.cell(d.name).metrics for d in sorted(run.cells.glob("*"))) if f.is_file()))
    tables = []
    for path in files:
        try:
            names = set(pq.read_schema(path).names)
            tables.append(pq.read_table(path, columns=[c for c in _COLUMNS if c in names]))
        except (OSError, pa.ArrowException) as exc:
            log.warning("%s: unreadable (%s); left out of the energy estimate", path, exc)
    if not tables:
        return [], None
    rows = [r for t in tables for r in t.to_pylist()]
    return rows, run.summary if run.summary.is_file() else run.cells


def measured_power_w(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[float, int]]:
    """(GPU type, engine) -> (mean measured power per GPU in W, repeats it comes from)."""
    sums: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        sources = set(str(r.get("power_source") or "").split("+"))
        energy_j, duration_s, n_dev = r.get("energy_j"), r.get("duration_s"), r.get("n_devices")
        if (r.get("status") != "ok" or not sources <= GPU_SENSORS or energy_j is None
                or duration_s is None or not n_dev or math.isnan(energy_j) or not duration_s > 0):
            continue
        acc = sums.setdefault((str(r.get("gpu")), str(r.get("engine"))), [0.0, 0.0, 0])
        acc[0] += float(energy_j)
        acc[1] += float(duration_s) * int(n_dev)
        acc[2] += 1
    return {k: (e / t, int(n)) for k, (e, t, n) in sums.items() if t > 0}


def estimate_energy(cfg: Config, rows: list[dict[str, Any]]) -> EnergyEstimate:
    """The GPU energy of the planned cells ``rows`` (``plan_rows``: gpu, engine, gpu_hours)."""
    out_dir = Path(cfg.output_dir)
    measured_rows, source = _read_rows(out_dir) if out_dir.is_dir() else ([], None)
    measured = measured_power_w(measured_rows)
    kwh = meas_h = prior_h = missing_h = 0.0
    used: set[tuple[str, str]] = set()
    missing: set[str] = set()
    prior_engines: set[str] = set()
    for r in rows:
        key = (r["gpu"], r["engine"])
        hours = float(r["gpu_hours"])
        tdp_w = cfg.gpus[r["gpu"]].tdp_w
        if key in measured:
            kwh += hours * measured[key][0] / 1000
            meas_h += hours
            used.add(key)
        elif tdp_w:
            kwh += hours * tdp_w * PRIOR_UTILISATION.get(r["engine"], 1.0) / 1000
            prior_h += hours
            prior_engines.add(r["engine"])
        else:
            missing_h += hours
            missing.add(r["gpu"])
    return EnergyEstimate(kwh=kwh, measured_gpu_hours=meas_h, prior_gpu_hours=prior_h,
                          missing_gpu_hours=missing_h, n_measured_rows=sum(measured[k][1] for k in used),
                          source=source if used else None, missing_types=tuple(sorted(missing)),
                          prior_engines=tuple(sorted(prior_engines)), output_dir=cfg.output_dir)
