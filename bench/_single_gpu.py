"""Shared set-up of the single-GPU bench scripts: one NCCL rank on cuda:0, then
the model with synthetic weights and a fixed batch of random prompts."""
from __future__ import annotations

import os
from typing import Any


def init_rank(port: int) -> tuple[Any, str]:
    """One-rank NCCL process group and model parallel; (device, GPU UUID)."""
    import torch
    import torch.distributed as dist

    from llmenergy.inference import tp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    tp.init_model_parallel(1)
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    torch.zeros(1, device=dev)  # create the CUDA context now
    uuid = str(torch.cuda.get_device_properties(dev).uuid)
    return dev, uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def build(arch: str, batch: int, prompt: int, gen: int, dev: Any) -> tuple[Any, list[list[int]]]:
    """(model, prompts): ``arch`` with synthetic fp16 weights and ``batch`` prompts of ``prompt`` tokens."""
    import torch

    from llmenergy.inference import weights

    model, _ = weights.build(arch, "synthetic", device=dev, dtype=torch.float16, seed=0,
                             max_batch_size=batch, max_seq_len=prompt + gen)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (prompt,), generator=g).tolist() for _ in range(batch)]
    return model, prompts
