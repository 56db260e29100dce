"""Tensor (model) parallel set-up on top of fairscale.

fairscale keeps its process groups in module globals; these helpers wrap its
initialisation (silencing its ``print``), answer rank/size questions, agree on a
measurement across ranks, and check that a shard count fits an architecture before
anything is built.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from llmenergy.arch import ModelArgs, shard_problem
from llmenergy.errors import UserError

log = logging.getLogger(__name__)


def init_model_parallel(world_size: int) -> None:
    """Set up fairscale model parallel of ``world_size`` ranks.

    ``torch.distributed`` must already be initialised with exactly ``world_size``
    ranks, except for ``world_size == 1``, where a private one-process gloo group
    is created when none exists.  Calling it again with the same size is a no-op.
    """
    if world_size < 1:
        raise UserError(f"model parallel size must be positive, got {world_size}")
    if not dist.is_initialized():
        if world_size != 1:
            raise UserError(f"torch.distributed must be initialised before model parallel "
                            f"of size {world_size}")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != world_size:
        raise UserError(f"model parallel size {world_size} differs from the "
                        f"torch.distributed world size {dist.get_world_size()}")
    if fs_init.model_parallel_is_initialized():
        if fs_init.get_model_parallel_world_size() != world_size:
            raise UserError(f"model parallel already initialised with size "
                            f"{fs_init.get_model_parallel_world_size()}, not {world_size}")
        return
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        fs_init.initialize_model_parallel(world_size)
    log.debug("fairscale: %s", chatter.getvalue().strip().replace("\n", "; "))


def ensure_model_parallel() -> int:
    """Initialise single-process model parallel if nothing is set up; return its size."""
    if not fs_init.model_parallel_is_initialized():
        init_model_parallel(dist.get_world_size() if dist.is_initialized() else 1)
    return fs_init.get_model_parallel_world_size()


def shutdown() -> None:
    """Forget fairscale's groups and destroy the default process group."""
    fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def mp_rank() -> int:
    return fs_init.get_model_parallel_rank()


def mp_world_size() -> int:
    return fs_init.get_model_parallel_world_size()


def slowest(values: list[float], group: Any, device: torch.device) -> list[float]:
    """The element-wise maximum of every rank's ``values`` over ``group`` (one all-reduce on
    ``device``, the rank's GPU under NCCL): the same list on every rank."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def check_shards(name: str, args: ModelArgs, shards: int) -> None:
    """Raise :class:`UserError` when ``shards`` does not fit ``args`` (see :func:`shard_problem`)."""
    problem = shard_problem(name, args, shards)
    if problem is not None:
        raise UserError(problem)
