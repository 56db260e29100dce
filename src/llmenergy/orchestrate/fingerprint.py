"""What defines a cell's measurement, and its fingerprint.

A cell id names the model, the dataset and the axes, not the weights, the
prompts, the dtype or the collector. :func:`definition` lists everything that
defines the measurement, from the :class:`~llmenergy.cellfiles.CellSpec` that
``launch.cell_spec`` builds with the device as configured (so no torch is
imported at Snakefile parse): the resolved weights path and the sizes and mtimes
of its checkpoint files (never their contents), arch, tokenizer, dtype, the
dataset (path, ``n_prompts``, seed, order, template, ``max_prompt_len``, ...),
``repeats``, ``seed``, ``warmup_tokens``, the collector settings, the engine and
the layout, and for the ``compiled`` engine the environment switches that are set
(:data:`llmenergy.arch.ENGINE_SWITCHES`: another kernel or attention is another
measurement; none set, no key, so the default's fingerprints stay as they were).
:func:`fingerprint_of` hashes it; ``cell.json`` records both.

Code changes alone do not change a fingerprint: the code version stays in
``cell.json``'s provenance. A finished cell whose recorded fingerprint differs
from the current config's is superseded: :func:`supersede` moves its files to
``cells/{id}/superseded/{old fingerprint}/`` (measurements are never deleted).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmenergy.arch import engine_switches
from llmenergy.cellfiles import CellSpec
from llmenergy.layout import CellFiles

log = logging.getLogger(__name__)

#: Sub-folder of a cell directory that keeps superseded measurements.
SUPERSEDED = "superseded"
#: Length of a fingerprint (hex digits of a SHA-256).
FINGERPRINT_LEN = 16


def _abs(path: str | None) -> str | None:
    return path if path in (None, "synthetic") else os.path.abspath(str(path))


def checkpoint_files(weights: str) -> list[list[Any]]:
    """``[[name, size_bytes, mtime_ns], ...]`` of a checkpoint's files (a file, or a
    folder's files); ``[]`` for synthetic weights or a path that does not exist."""
    if weights == "synthetic":
        return []
    path = Path(weights)
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        out = []
        for p in files:
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
        return out
    except OSError:
        return []


def definition(spec: CellSpec, *, checkpoint: list[list[Any]] | None = None) -> dict[str, Any]:
    """Everything that defines ``spec``'s measurement, as plain JSON values.

    ``checkpoint`` (from :func:`checkpoint_files`) may be passed in to stat a
    checkpoint shared by many cells once.
    """
    dataset = asdict(spec.dataset)
    dataset.pop("name", None)  # in the cell id
    dataset["path"] = _abs(dataset["path"])
    dataset["train_path"] = _abs(dataset.get("train_path"))
    switches = engine_switches()
    return {
        **({"engine_switches": switches} if switches and spec.cell.engine == "compiled" else {}),
        "arch": spec.arch,
        "weights": _abs(spec.weights),
        "checkpoint": checkpoint_files(spec.weights) if checkpoint is None else checkpoint,
        "tokenizer": _abs(spec.tokenizer),
        "stop_at_eos": spec.stop_at_eos,
        "device": spec.device,
        "dtype": spec.dtype,
        "dataset": dataset,
        "repeats": spec.repeats,
        "seed": spec.seed,
        "warmup_tokens": spec.warmup_tokens,
        "collector": asdict(spec.collector),
        "engine": spec.cell.engine,
        "layout": [spec.nodes, spec.ranks_per_node],
    }


def fingerprint_of(defn: dict[str, Any]) -> str:
    """A short, stable hash of a :func:`definition`."""
    text = json.dumps(defn, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_LEN]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def changes(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What changed between two definitions, as one line (``weights: synthetic → /data/7B``)."""
    if not old:
        return "the recorded definition is missing"
    a, b = _flat(old), _flat(new)
    diffs = [f"{k}: {_short(a.get(k))} → {_short(b.get(k))}" for k in sorted(a.keys() | b.keys())
             if a.get(k) != b.get(k) and k != "checkpoint"]
    if a.get("checkpoint") != b.get("checkpoint"):  # sizes and mtimes: too long to show
        n_old, n_new = len(a.get("checkpoint") or []), len(b.get("checkpoint") or [])
        diffs.append(f"checkpoint files: {n_old} → {n_new}" if n_old != n_new
                     else "checkpoint files: sizes or mtimes changed")
    return "; ".join(diffs) or "same definition, another fingerprint"


def supersede(files: CellFiles, old_fingerprint: str | None) -> Path:
    """Move a cell's files (not earlier superseded ones) to ``superseded/{old fingerprint}/``."""
    dest = files.root / SUPERSEDED / (old_fingerprint or "unknown")
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{old_fingerprint or 'unknown'}.{n}")
    dest.mkdir(parents=True)
    for entry in sorted(files.root.iterdir()):
        if entry.name != SUPERSEDED:
            entry.replace(dest / entry.name)
    log.info("%s: superseded outputs moved to %s", files.root.name, dest)
    return dest
