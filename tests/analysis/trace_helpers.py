"""A synthetic power trace of known energy per phase, as NVML reports one.

The true power is a step function: one constant level per segment of a
timeline. The sensor updates every ``period_s`` (100 ms, as NVML's counter and
instant power on H100/H200): at each update instant ``u`` the counter holds the
exact integral of the steps up to ``u``, and the instant field the power at
``u``. The collector polls every ``poll_s`` (20 ms), ``offset_s`` after the
update grid, and each poll reads the latest update: the staircase of the real
files. The analytic energy of a segment is ``power_w × duration_s``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

S = 10**9
T0_NS = 1_700_000_000 * S


def device_samples(name: str, t_s: np.ndarray, energy_mj: np.ndarray | None, power_w: np.ndarray | None,
            domain: str = "gpu", source: str = "nvml") -> pd.DataFrame:
    """One device's power rows at times ``t_s`` (s) with the given counter and instant power."""
    n = len(t_s)
    return pd.DataFrame({
        "node": "n0", "device": name, "device_index": np.int32(0), "domain": domain,
        "timestamp_ns": (t_s * S).astype(np.int64),
        "energy_mj": energy_mj if energy_mj is not None else np.full(n, np.nan),
        "power_w": power_w if power_w is not None else np.full(n, np.nan),
        "gpu_util_pct": np.full(n, 80.0), "mem_util_pct": np.full(n, 30.0), "source": source,
    })


@dataclass(frozen=True)
class Segment:
    phase: str | None  # None: no event covers it
    duration_s: float
    power_w: float
    repeat: int = -1
    batch_index: int = -1


def timeline(segments: list[Segment]) -> pd.DataFrame:
    """Start and end (s after T0) of each segment, with its analytic energy."""
    ends = np.cumsum([s.duration_s for s in segments])
    starts = ends - [s.duration_s for s in segments]
    return pd.DataFrame({
        "phase": [s.phase for s in segments], "repeat": [s.repeat for s in segments],
        "batch_index": [s.batch_index for s in segments], "start_s": starts, "end_s": ends,
        "power_w": [s.power_w for s in segments],
        "energy_j": [s.power_w * s.duration_s for s in segments],
    })


def events_of(tl: pd.DataFrame, cell_id: str = "c") -> pd.DataFrame:
    ev = tl[tl["phase"].notna()].reset_index(drop=True)
    return pd.DataFrame({
        "cell_id": cell_id, "repeat": ev["repeat"].astype("int32"), "phase": ev["phase"],
        "batch_index": ev["batch_index"].astype("int32"),
        "start_ns": T0_NS + np.round(ev["start_s"] * S).astype("int64"),
        "end_ns": T0_NS + np.round(ev["end_s"] * S).astype("int64"),
        "n_seqs": np.int32(4), "tokens_in": np.int64(0), "tokens_out": np.int64(0),
    })


def _true_energy_mj(tl: pd.DataFrame, t_s: np.ndarray) -> np.ndarray:
    """∫ power from the start of the timeline to each ``t_s`` (clipped to it), in mJ."""
    starts, ends, p = tl["start_s"].to_numpy(), tl["end_s"].to_numpy(), tl["power_w"].to_numpy()
    covered = np.clip(t_s[:, None], starts[None, :], ends[None, :]) - starts[None, :]
    return (covered * p[None, :]).sum(axis=1) * 1000.0


def _power_at(tl: pd.DataFrame, t_s: np.ndarray) -> np.ndarray:
    i = np.clip(np.searchsorted(tl["end_s"].to_numpy(), t_s, side="right"), 0, len(tl) - 1)
    return tl["power_w"].to_numpy()[i]


def nvml_trace(tl: pd.DataFrame, *, device: str = "GPU-0000", node: str = "node0",
               period_s: float = 0.1, poll_s: float = 0.02, offset_s: float = 0.005,
               stop_s: float | None = None, counter_base_mj: float = 7e6) -> pd.DataFrame:
    """Samples of one device over the timeline (until ``stop_s`` if given)."""
    end = float(tl["end_s"].iloc[-1]) if stop_s is None else stop_s
    polls = np.arange(offset_s, end, poll_s)
    updates = np.floor(np.round(polls / period_s, 9)) * period_s  # latest update at or before each poll
    return pd.DataFrame({
        "node": node, "device": device, "device_index": np.int32(0), "domain": "gpu",
        "timestamp_ns": T0_NS + np.round(polls * S).astype("int64"),
        "energy_mj": counter_base_mj + _true_energy_mj(tl, updates),
        "power_w": _power_at(tl, updates), "gpu_util_pct": 50.0, "mem_util_pct": 20.0,
        "source": "nvml",
    })


def edge_bound_j(tl: pd.DataFrame, i: int, period_s: float = 0.1, offset_s: float = 0.005) -> float:
    """Most a counter interpolated between update instants can misplace at the two edges of
    segment ``i``: per edge, a power step ΔP inside one update interval moves at most
    ΔP × period / 4 across the edge, and detecting updates ``offset_s`` late ΔP × offset_s."""
    p = tl["power_w"].to_numpy()
    left = abs(p[i] - p[i - 1]) if i > 0 else 0.0
    right = abs(p[i + 1] - p[i]) if i + 1 < len(p) else 0.0
    return (left + right) * (period_s / 4 + offset_s)


def standard_segments() -> list[Segment]:
    """A cell as the engines emit it: idle, load, compile, warm-up, two repeats of two
    batches, host gaps between batches, and stretches no event covers. Repeat 0 has a
    prefill shorter than the update period and a 0.53 s decode; repeat 1 is resolved."""
    G = Segment
    return [G(None, 1.03, 110), G("idle", 5.04, 120), G(None, 0.43, 140), G("load", 6.02, 220),
            G("compile", 20.07, 260), G(None, 0.31, 150), G("warmup", 10.05, 400),
            G("prefill", 0.08, 520, 0, 0), G("decode", 12.01, 450, 0, 0), G(None, 0.25, 180),
            G("prefill", 0.06, 520, 0, 1), G("decode", 0.53, 430, 0, 1), G(None, 0.27, 180),
            G("prefill", 1.51, 520, 1, 0), G("decode", 12.02, 450, 1, 0), G(None, 0.23, 180),
            G("prefill", 1.23, 510, 1, 1), G("decode", 11.04, 440, 1, 1), G(None, 0.55, 130)]


def write_trace_cell(root: Path, cell_id: str = "trace", *, segments: list[Segment] | None = None,
                     gpus: list[dict[str, Any]] | None = None, power: pd.DataFrame | None = None,
                     collector: str = "nvml", stop_at_eos: bool = False,
                     tokens_after_eos: list[int | None] | None = None) -> tuple[Path, pd.DataFrame]:
    """A cell directory (spec, cell.json, events, responses, power) over a synthetic trace;
    two repeats of two batches of 4 prompts. Returns the directory and the timeline."""
    from llmenergy.atomic import write_parquet
    from llmenergy.cellfiles import Cell, CellRecord, CellSpec, Provenance
    from llmenergy.config import CollectorSpec, Policies
    from llmenergy.data.prompts import DatasetSpec

    tl = timeline(segments or standard_segments())
    cdir = root / "cells" / cell_id
    cdir.mkdir(parents=True)
    cell = Cell(model="tiny", dataset="alpaca", gpu="H200", shards=1, batch_size=4, max_gen_len=16,
                power_cap_w=None)
    CellSpec(cell=cell, arch="llama-tiny", weights="synthetic", tokenizer=None, stop_at_eos=stop_at_eos,
             device="cuda", dtype="float16", repeats=2, seed=0, warmup_tokens=8, nodes=1, ranks_per_node=1,
             dataset=DatasetSpec(name="alpaca", format="alpaca", path="synthetic", n_prompts=8),
             collector=CollectorSpec(backend=collector), policies=Policies()).write(cdir / "spec.json")
    gpus = gpus if gpus is not None else [{"node": "node0", "rank": 0, "uuid": "GPU-0000",
                                           "name": "NVIDIA H200", "index": 0}]
    CellRecord(cell=cell, status="ok", reason=None, repeats=2, launcher="local",
               provenance=Provenance(gpus=gpus)).write(cdir / "cell.json")
    write_parquet(cdir / "events.parquet", events_of(tl, cell_id))
    after = tokens_after_eos or [None] * 16
    resp = pd.DataFrame([dict(cell_id=cell_id, repeat=r, batch_index=b, prompt_id=f"p{b}{k}", tokens_in=8,
                              tokens_out=16, words_out=5, text="a b c d e", reference=None, correct=None,
                              template=None, tokens_after_eos=after[r * 8 + b * 4 + k])
                         for r in range(2) for b in range(2) for k in range(4)])
    write_parquet(cdir / "responses.parquet", resp.astype({"tokens_after_eos": "Int64"}))
    if collector != "none":
        write_parquet(cdir / "power.parquet", nvml_trace(tl) if power is None else power)
    return cdir, tl
