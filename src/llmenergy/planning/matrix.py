"""The experiment matrix: groups → cartesian cells, feasibility, ids and paths.

A :class:`Cell` owns its identity and every path derived from it. Cells that
cannot run (shards that do not divide the heads, a model that does not fit in
shards × GPU memory, more shards than a job may have) are kept out of the plan
as :class:`Infeasible` entries with a reason.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from llmenergy.arch import (
    DTYPE_BYTES,
    PRECISION_DTYPE,
    compute_capability,
    engine_problem,
    precision_problem,
    kv_cache_bytes,
    shard_problem,
    weight_bytes,
    weight_loads,
)
from llmenergy.cellfiles import AXES, Cell
from llmenergy.config import AXIS_DEFAULTS, Config
from llmenergy.errors import ConfigError
from llmenergy.slurm import ShardLayoutError, node_layout

MAX_SHARDS = 32
# Per GPU: CUDA context, allocator slack and activations not counted in weights + KV cache.
RESERVE_GB_PER_GPU = 2.0
# Host memory of one rank besides the weights it loads: Python, torch, the CUDA context and
# NCCL buffers on a GPU; Python and torch alone when the model runs on the CPU.
HOST_MB_PER_RANK = {"cuda": 4096, "cpu": 1024}
# Host memory of a node's agent and power collector.
HOST_MB_PER_NODE = 512


@dataclass(frozen=True)
class Infeasible:
    cell: Cell
    reason: str


@dataclass(frozen=True)
class Plan:
    cells: list[Cell]
    infeasible: list[Infeasible]

    def by_id(self) -> dict[str, Cell]:
        return {c.id: c for c in self.cells}

    def get(self, cell_id: str) -> Cell:
        try:
            return self.by_id()[cell_id]
        except KeyError:
            raise ConfigError(f"cell {cell_id!r} is not in the plan") from None


def dtype_for(cfg: Config, cell: Cell) -> str:
    """The dtype a cell's model is built in (and computes in): ``models.<name>.dtype`` when
    set, float32 on a CPU device, else the precision's (fp16, int8, fp8: float16; bf16:
    bfloat16).  int8/fp8 weights are quantised from it at load."""
    dtype = cfg.models[cell.model].dtype
    if dtype != "auto":
        return dtype
    if cfg.gpus[cell.gpu].device == "cpu":
        return "float32"
    return PRECISION_DTYPE[cell.precision]


def memory_problem(cfg: Config, cell: Cell) -> str | None:
    """Why ``cell`` does not fit in shards × GPU memory, or None.

    int8/fp8 weights are quantised after the model is loaded in its dtype, layer by layer,
    so the peak is the 16-bit weights whatever the precision.
    """
    spec, gpu = cfg.models[cell.model], cfg.gpus[cell.gpu]
    dtype = dtype_for(cfg, cell)
    seq = cfg.datasets[cell.dataset].max_prompt_len + cell.max_gen_len
    need = weight_bytes(spec.args, dtype) + kv_cache_bytes(spec.args, cell.batch_size, seq, dtype)
    if cell.engine == "hf":  # its own static cache, and wq/wk copied into HF's rotary layout
        a = spec.args
        qk = a.n_layers * (a.n_heads + a.kv_heads) * a.head_dim * a.dim * DTYPE_BYTES[dtype]
        need += kv_cache_bytes(a, cell.batch_size, seq, dtype) + qk
    have = cell.shards * (gpu.memory_gb - RESERVE_GB_PER_GPU) * 1e9
    if need > have:
        return (f"{cell.model} × {cell.shards} × {cell.gpu}: needs {need / 1e9:.0f} GB (weights + KV cache), "
                f"{cell.shards} × {gpu.memory_gb:g} GB holds {have / 1e9:.0f} GB usable")
    return None


def feasibility(cfg: Config, cell: Cell) -> str | None:
    if cell.shards > MAX_SHARDS:
        return f"{cell.shards} shards: more than the {MAX_SHARDS} GPUs a cell may use"
    try:
        layout(cfg, cell)
    except ShardLayoutError as exc:
        return str(exc)
    gpu = cfg.gpus[cell.gpu]
    device = "cpu" if gpu.device == "cpu" else "cuda"
    return (shard_problem(cell.model, cfg.models[cell.model].args, cell.shards)
            or engine_problem(cell.engine, cell.shards, device)
            or precision_problem(cell.precision, cell.engine, device, cell.gpu,
                                 compute_capability(cell.gpu, gpu.compute_capability))
            or memory_problem(cfg, cell))


def expand(cfg: Config) -> Plan:
    """Expand every group of ``cfg.matrix`` into cells, dropping infeasible ones with a reason."""
    seen: dict[str, int] = {}
    cells: list[Cell] = []
    infeasible: list[Infeasible] = []
    for i, group in enumerate(cfg.matrix):
        axes = {**AXIS_DEFAULTS, **group}
        for values in itertools.product(*(axes[n] for n in AXES)):
            cell = Cell(**dict(zip(AXES, values, strict=True)))
            if cell.id in seen:
                raise ConfigError(
                    f"{cfg.source}: matrix[{i}]: cell {cell.id} is already produced by matrix[{seen[cell.id]}]")
            seen[cell.id] = i
            reason = feasibility(cfg, cell)
            if reason:
                infeasible.append(Infeasible(cell, reason))
            else:
                cells.append(cell)
    if not cells:
        first = infeasible[0].reason if infeasible else "no cells"
        raise ConfigError(f"{cfg.source}: matrix: no feasible cells ({len(infeasible)} left out; first: {first})")
    return Plan(cells, infeasible)


def layout(cfg: Config, cell: Cell) -> tuple[int, int]:
    """(nodes, ranks per node) of a cell, one rank per GPU (:func:`llmenergy.slurm.node_layout`)."""
    return node_layout(cell.shards, cfg.gpus[cell.gpu].gpus_per_node, cell.gpu)


def host_mem_mb(cfg: Config, cell: Cell) -> tuple[int, str]:
    """(MB of host memory per node, where the number comes from) for a cell's Slurm job.

    ``gpus.<type>.mem_mb_per_gpu`` × GPUs per node when the config sets it; else an
    estimate: each rank memory-maps the checkpoint and reads its shard of the weights
    (a Meta checkpoint of another MP degree is resharded, an HF one sliced, by the same
    bytes), plus :data:`HOST_MB_PER_RANK`; on a CPU device the weights and KV cache live
    in host memory for the whole run.  Synthetic weights are made on the device.
    """
    spec, gpu = cfg.models[cell.model], cfg.gpus[cell.gpu]
    _, per_node = layout(cfg, cell)
    if gpu.mem_mb_per_gpu is not None:
        return gpu.mem_mb_per_gpu * per_node, f"gpus.{cell.gpu}.mem_mb_per_gpu"
    dtype = dtype_for(cfg, cell)
    cpu = gpu.device == "cpu"
    per_rank = 0.0
    if cpu or spec.weights != "synthetic":
        per_rank += weight_bytes(spec.args, dtype) / cell.shards
    if cpu:
        seq = cfg.datasets[cell.dataset].max_prompt_len + cell.max_gen_len
        per_rank += kv_cache_bytes(spec.args, cell.batch_size, seq, dtype) / cell.shards
    mb = per_node * (per_rank / 2**20 + HOST_MB_PER_RANK["cpu" if cpu else "cuda"]) + HOST_MB_PER_NODE
    return 256 * math.ceil(mb / 256), "estimate"


def estimate_runtime_s(cfg: Config, cell: Cell) -> float:
    """A rough upper estimate of a cell's wall time, for the plan and Slurm's --time.

    Decode is memory-bound: each step streams the shard's weights once (one byte per
    linear weight under int8/fp8). A repeat lasts at least ``collector.min_window_s``
    (its batches are cycled) and adds its prefill-only loop (``collector.prefill_window_s``).
    """
    spec, gpu, ds = cfg.models[cell.model], cfg.gpus[cell.gpu], cfg.datasets[cell.dataset]
    dtype = dtype_for(cfg, cell)
    nodes, _ = layout(cfg, cell)
    # Eager fairscale decode ran at ~3x the bandwidth bound, never faster than ~30 ms/step (H100, 7B).
    step_s = max(weight_bytes(spec.args, dtype, cell.precision) / cell.shards / (gpu.mem_bandwidth_gbs * 1e9) * 3, 0.03)
    step_s += 0.01 * (nodes - 1)  # two all-reduces per layer cross the network
    if gpu.device == "cpu":
        step_s = max(step_s, 0.01 * cell.shards)
    batches = math.ceil(ds.n_prompts / cell.batch_size)
    repeat_s = batches * (cell.max_gen_len + ds.max_prompt_len / 8) * step_s
    repeat_s = max(repeat_s, cfg.collector.min_window_s) + cfg.collector.prefill_loop_s()
    return estimate_load_s(cfg, cell) + cfg.collector.idle_baseline_s + cfg.repeats * repeat_s


def estimate_load_s(cfg: Config, cell: Cell) -> float:
    """The model-load part of :func:`estimate_runtime_s`: synthesis or reading at ~1 GB/s per rank,
    once per load (a bf16 job loads fp16 weights first for its logit references: ``weight_loads``)."""
    per_load_s = weight_bytes(cfg.models[cell.model].args, dtype_for(cfg, cell)) / cell.shards / 1e9
    return 60 + weight_loads(cell.precision, cell.engine) * per_load_s
