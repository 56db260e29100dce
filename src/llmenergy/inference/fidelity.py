"""What a narrow precision costs in logits, measured in the cell that runs it.

int8 and fp8 quantise a 16-bit model's block weights at load and release the 16-bit
copies (:func:`llmenergy.inference.quant.prepare`). Before that, in the group's load,
:func:`references` runs the first :data:`FIDELITY_PROMPTS` prompts of every dataset of
the group through the fp16 model (the reference engine's forward) and keeps the
logits of each prompt's last :data:`FIDELITY_TAIL` positions on the host. After a
cell's measured repeats, :func:`measure` runs the same prompts through the cell's
engine (its eager prefill, with the quantised linears) and compares position by
position (:func:`compare`): the relative L2 difference of the logits, the KL divergence
of the next-token distributions, and whether the most likely next token is the same.
Both sides see the same tokens (teacher forcing), so one early difference does not
carry into every later position, as it would when comparing generated text.

bf16 loads the checkpoint as bfloat16, so its group's first cell loads the weights a
first time as fp16 (float32 on a CPU device) for :func:`references`, frees that model,
then loads its own; its cells are compared as int8's are, through the cell engine's
``tail_logits`` (the ``hf`` engine has none: its record says so). fp16 is the
reference itself: not in :data:`COMPARED`. With synthetic weights the numbers describe
random matrices, not a language model; the report marks them so.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from llmenergy.cellfiles import FIDELITY_PROMPTS, FIDELITY_TAIL, Fidelity
from llmenergy.inference.generate import left_pad

log = logging.getLogger(__name__)

#: The precisions whose cells compare their logits with fp16's.
COMPARED = ("bf16", "int8", "fp8")

Prompts = list[list[int]]
#: ``(tokens [B, S] left-padded, n_pad [B] or None, tail) -> logits [B, tail, V]``
TailForward = Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]


def fidelity_prompts(encoded: Prompts, max_seq_len: int) -> Prompts:
    """The prompts a cell's logits are compared on: its dataset's first
    :data:`FIDELITY_PROMPTS`, each cut from the left to fit ``max_seq_len``."""
    return [list(p[-max_seq_len:]) for p in encoded[:FIDELITY_PROMPTS] if p]


@torch.inference_mode()
def tail_logits(forward: TailForward, prompts: Prompts, max_batch_size: int,
                device: torch.device) -> list[torch.Tensor]:
    """Per prompt, float32 logits [t, V] on the host of its last ``t = min(FIDELITY_TAIL,
    len)`` positions; the prompts in chunks of ``max_batch_size`` (the KV cache's)."""
    out: list[torch.Tensor] = []
    for i in range(0, len(prompts), max_batch_size):
        chunk = prompts[i:i + max_batch_size]
        tokens, n_pad = left_pad(chunk, 0, device)
        tail = min(FIDELITY_TAIL, tokens.shape[1])
        logits = forward(tokens, n_pad, tail).float().cpu()
        for row, p in zip(logits, chunk, strict=True):
            out.append(row[tail - min(tail, len(p)):])  # a short prompt's pads are not positions
    return out


#: A dataset's prompts, their reference logits, and what those came from (``fp16``).
Reference = tuple[Prompts, list[torch.Tensor], str]


def references(model: Any, prompts_by_key: dict[str, Prompts]) -> dict[str, Reference]:
    """Each key's prompts and their logits through ``model``'s own (16-bit) forward."""
    def forward(tokens: torch.Tensor, n_pad: torch.Tensor | None, tail: int) -> torch.Tensor:
        return model(tokens, 0, n_pad=n_pad, tail=tail)

    device = model.tok_embeddings.weight.device
    name = reference_name(model)
    refs = {key: (prompts, tail_logits(forward, prompts, model.max_batch_size, device), name)
            for key, prompts in prompts_by_key.items() if prompts}
    log.info("fp16 reference logits of %d prompt set(s) kept for the precision's comparison", len(refs))
    return refs


class NonFiniteLogits(RuntimeError):
    """The cell's engine gave inf/NaN logits: its generated tokens are not to be trusted."""


def compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> Fidelity:
    """``got`` against ``want`` (per prompt [t, V], the same positions): their relative L2
    difference, the KL divergence KL(want || got) in nats, and top-1 agreement per position.

    Raises :class:`NonFiniteLogits` when ``got`` has an inf or NaN; a reference that has
    one gives a record with the reason instead."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=False)):
        raise ValueError("logits to compare differ in shape")
    g, w = torch.cat(got).double(), torch.cat(want).double()
    if len(w) == 0:
        return Fidelity(reason="no positions to compare")
    bad_g, bad_w = (int((~t.isfinite()).any(-1).sum()) for t in (g, w))
    if bad_g:
        raise NonFiniteLogits(f"the engine's logits are inf/NaN at {bad_g} of {len(g)} prompt positions "
                              f"(the fp16 weights' are finite at {len(w) - bad_w})")
    if bad_w:
        return Fidelity(prompts=len(want), positions=len(w),
                        reason=f"the fp16 reference logits are inf/NaN at {bad_w} of {len(w)} positions")
    rel = (g - w).norm(dim=-1) / w.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    kl = F.kl_div(F.log_softmax(g, -1), F.log_softmax(w, -1), log_target=True, reduction="none").sum(-1)
    return Fidelity(prompts=len(want), positions=len(w), logit_rel_diff=float(rel.mean()),
                    logit_rel_diff_max=float(rel.max()), token_kl_nats=float(kl.mean()),
                    top1_agree=float((g.argmax(-1) == w.argmax(-1)).double().mean()))


def measure(engine: Any, reference: Reference | None) -> Fidelity:
    """The cell's engine against its dataset's fp16 reference logits."""
    forward = getattr(engine, "tail_logits", None)
    if forward is None:
        return Fidelity(reason=f"the {getattr(engine, 'name', type(engine).__name__)} engine cannot give "
                               "per-position logits")
    if reference is None:
        return Fidelity(reason="no fp16 reference logits for this cell's prompts")
    prompts, want, against = reference
    got = tail_logits(forward, prompts, engine.max_batch_size, engine.device)
    fid = dataclasses.replace(compare(got, want), against=against)
    log.info("logits against fp16 on %d prompts (%d positions): rel diff %.3g (max %.3g), KL %.3g nats, "
             "top-1 agree %.3f", fid.prompts, fid.positions, fid.logit_rel_diff, fid.logit_rel_diff_max,
             fid.token_kl_nats, fid.top1_agree)
    return fid


def reference_name(model: Any) -> str:
    """What the reference logits came from: the model's load dtype (fp16 on a GPU; float32
    on CPU, where the tiny models run in float32)."""
    name = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    return {"float16": "fp16", "bfloat16": "bf16"}.get(name, name)

