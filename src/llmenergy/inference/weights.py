"""Build a sharded model and fill it with synthetic or checkpoint weights.

:func:`build` is the one factory: it sets up model parallel if needed, checks
that the shard count fits the architecture, builds the model on ``meta``,
allocates it straight on the target device and dtype, then fills it.

Synthetic weights
-----------------
Values come from a counter-based hash, not a stateful generator: element
``i`` (row-major index in the *full*, unsharded tensor) of parameter ``name``
is ``uniform(hash(seed, name, i))`` scaled to ``std = 1/sqrt(fan_in)``
(embedding ``std = 0.02``).  Each rank computes only its own slice, on its own
device, with integer arithmetic that gives bit-identical results on CPU and
GPU.  So the full tensor is the same for any shard count, any device, and
needs no communication.  The price is a few integer passes per element
(~0.5 s for 7B on an H100) and uniform rather than normal values, which is
irrelevant for energy measurements.  Norm weights are one.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from llmenergy.checkpoints import STRUCTURAL
from llmenergy.errors import CheckpointError
from llmenergy.inference import tp
from llmenergy.inference.model import (
    ModelArgs,
    Transformer,
    build_on_meta,
    full_shapes,
    get_arch,
    materialize,
    num_bytes,
    shard_dim,
)

log = logging.getLogger(__name__)

_M32 = 0xFFFFFFFF
_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """How the weights of one rank were obtained."""

    format: str  # synthetic | meta | hf
    source: str  # "synthetic" or the checkpoint directory
    source_mp: int | None  # model-parallel degree of the checkpoint files
    shards: int
    rank: int
    device: str
    dtype: str
    n_params_local: int
    weight_bytes_local: int
    build_duration_s: float  # construction on meta + allocation
    load_duration_s: float  # whole build(), including filling the weights

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_arch(arch: str | ModelArgs) -> tuple[str, ModelArgs]:
    if isinstance(arch, ModelArgs):
        return "custom", arch
    return arch, get_arch(arch)


def build(arch: str | ModelArgs, weights: str | Path, *, device: torch.device | str,
          dtype: torch.dtype, seed: int = 0, max_batch_size: int,
          max_seq_len: int) -> tuple[Transformer, LoadInfo]:
    """Build this rank's shard of ``arch`` with ``weights`` ("synthetic" or a directory).

    Model parallel must be initialised (:func:`llmenergy.inference.tp.init_model_parallel`);
    in a single process it is set up automatically.
    """
    from llmenergy.inference import checkpoint

    t0 = time.perf_counter()
    shards = tp.ensure_model_parallel()
    rank = tp.mp_rank()
    name, args = resolve_arch(arch)
    source: checkpoint.Checkpoint | None = None
    if str(weights) == "synthetic":
        fmt, src = "synthetic", "synthetic"
    else:
        source = checkpoint.open_checkpoint(Path(weights))
        args = reconcile(name, args, source.args, source.path)
        fmt, src = source.format, str(source.path)
    tp.check_shards(name, args, shards)
    model = build_on_meta(args, max_batch_size, max_seq_len)
    materialize(model, device, dtype)
    t_built = time.perf_counter()
    if source is None:
        fill_synthetic(model, seed=seed, rank=rank, shards=shards)
    else:
        source.load_into(model, rank=rank, shards=shards)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    info = LoadInfo(
        format=fmt, source=src, source_mp=None if source is None else source.mp,
        shards=shards, rank=rank, device=str(device), dtype=str(dtype).removeprefix("torch."),
        n_params_local=sum(p.numel() for p in model.parameters()),
        weight_bytes_local=num_bytes(model), build_duration_s=t_built - t0,
        load_duration_s=t1 - t0)
    log.info("built %s (%s weights) rank %d/%d on %s in %.2f s", name, fmt, rank, shards,
             device, info.load_duration_s)
    return model, info


def reconcile(name: str, arch: ModelArgs, found: ModelArgs, path: Path) -> ModelArgs:
    """Check a checkpoint's architecture against the named one; the checkpoint's wins."""
    if name != "custom":
        for field in STRUCTURAL:
            want, got = getattr(arch, field), getattr(found, field)
            if want != got:
                raise CheckpointError(
                    f"{path}: checkpoint has {field} {got} but {name} has {want}")
    return found.replace(max_seq_len=max(found.max_seq_len, arch.max_seq_len))


def fill_synthetic(model: Transformer, *, seed: int, rank: int, shards: int) -> None:
    """Fill every non-norm weight of this rank's shard with hashed uniform values."""
    full = full_shapes(model.args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
                continue
            shape = full[name]
            std = 0.02 if name.startswith("tok_embeddings") else 1.0 / math.sqrt(shape[1])
            d = shard_dim(name)
            row0 = col0 = 0
            if d == 0:
                row0 = rank * param.shape[0]
            elif d == 1:
                col0 = rank * param.shape[1]
            synthetic_block(param, key=param_key(seed, name), full_shape=shape,
                            row0=row0, col0=col0, std=std)


def param_key(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


def synthetic_block(out: torch.Tensor, *, key: int, full_shape: tuple[int, ...], row0: int,
                    col0: int, std: float) -> None:
    """Write the hashed values of rows/cols ``[row0:, col0:]`` of a full matrix into ``out``."""
    rows, cols = out.shape
    full_rows, full_cols = full_shape
    step = max(1, _CHUNK_ELEMENTS // cols)
    device = out.device
    small = full_rows * full_cols < (1 << 31)
    itype = torch.int32 if small else torch.int64
    col_idx = torch.arange(col0, col0 + cols, device=device, dtype=itype)
    k1, k2, k3 = (_i32(_hash_int(key ^ salt)) for salt in (0, 0x9E3779B9, 0x85EBCA6B))
    scale = std * math.sqrt(3.0) / float(1 << 23)
    for r in range(0, rows, step):
        r_end = min(rows, r + step)
        row_idx = torch.arange(row0 + r, row0 + r_end, device=device, dtype=itype)
        idx = row_idx[:, None] * full_cols + col_idx[None, :]
        if small:
            h = hash32(idx ^ k1)
        else:  # fold the bits above 31 in separately
            hi = (idx >> 31).to(torch.int32)
            h = hash32((idx & 0x7FFFFFFF).to(torch.int32) ^ k1) ^ hash32(hi ^ k3)
        h = hash32(h ^ k2)
        # top 24 bits → integers in [-2^23, 2^23) → uniform with the requested std
        vals = (((h >> 8) & 0xFFFFFF) - (1 << 23)).to(torch.float32).add_(0.5).mul_(scale)
        out[r:r_end].copy_(vals)


def _i32(v: int) -> int:
    """``v`` in ``[0, 2**32)`` as the signed 32-bit integer with the same bits."""
    return v - (1 << 32) if v >= (1 << 31) else v


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int32 tensors (two's-complement wrap-around).

    Logical right shifts are emulated with masks; the bits equal
    :func:`hash32_reference` on the unsigned values.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _i32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def hash32_reference(v: int) -> int:
    """Pure-Python :func:`hash32` on an unsigned 32-bit value (for tests)."""
    v ^= v >> 16
    v = (v * 0x7FEB352D) & _M32
    v ^= v >> 15
    v = (v * 0x846CA68B) & _M32
    return v ^ (v >> 16)


def _hash_int(v: int) -> int:
    return hash32_reference(v & _M32)
