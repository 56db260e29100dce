"""Glue between the Snakemake rules and llmenergy.

Called at every parse of the Snakefile (the submit host's and every Slurm
job's), so it only validates the config and expands the matrix: no filesystem
scans and no heavy imports (no torch).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from llmenergy import atomic
from llmenergy.config import Config, from_dict
from llmenergy.matrix import Cell, Plan, estimate_runtime_s, expand

log = logging.getLogger(__name__)

RESOLVED_CONFIG = ".llmenergy/config.json"


@dataclass
class Context:
    cfg: Config
    plan: Plan
    config_arg: str

    @property
    def output_dir(self) -> str:
        return self.cfg.output_dir

    @property
    def cell_ids(self) -> list[str]:
        return [c.id for c in self.plan.cells]

    @cached_property
    def _cells(self) -> dict[str, Cell]:
        return self.plan.by_id()

    def resources_of(self, cell_id: str) -> dict[str, Any]:
        from llmenergy.launch import cell_resources

        cell = self._cells[cell_id]
        res = dict(cell_resources(self.cfg, cell, runtime_s=estimate_runtime_s(self.cfg, cell)))
        # Optional sbatch options go through slurm_extra: every cell must have the same
        # resource keys, and the plugin turns an empty constraint/qos into `-C ''`.
        extra = [f"--{k}={res.pop(k)}" for k in ("constraint", "qos") if k in res]
        res["slurm_extra"] = " ".join(extra)
        return res

    def rule_resources(self) -> dict[str, Callable[..., Any]]:
        """Resource callables for ``rule run_cell`` (one Slurm job per cell)."""
        keys = sorted({k for cid in self.cell_ids for k in self.resources_of(cid)})

        def getter(key: str) -> Callable[..., Any]:
            return lambda wildcards: self.resources_of(wildcards.cell).get(key, "")

        return {k: getter(k) for k in keys}


def _source(configfiles: Sequence[str | Path]) -> str:
    return str(configfiles[-1]) if configfiles else "config"


def load(config: dict[str, Any], configfiles: Sequence[str | Path] = ()) -> Context:
    """Validate Snakemake's merged ``config`` and expand the matrix.

    The merged config is stored as ``{output_dir}/.llmenergy/config.json`` (only
    rewritten when it changes) so that each job's ``llmenergy run-cell`` sees
    exactly what Snakemake saw, including ``--config`` overrides.
    """
    cfg = from_dict(dict(config), source=Path(_source(configfiles)).name)
    plan = expand(cfg)
    resolved = Path(cfg.output_dir) / RESOLVED_CONFIG
    text = json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n"
    if not resolved.exists() or resolved.read_text() != text:
        atomic.write_text(resolved, text)
    return Context(cfg=cfg, plan=plan, config_arg=str(resolved))
