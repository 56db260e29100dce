"""Greedy generation in separately timed phases (gpt-fast style).

Prompts of different lengths are **left-padded** to the longest one and the
padding is masked out of attention (:func:`llmenergy.inference.model.attention_mask`).
RoPE is relative, so a padded sequence attends exactly as it would alone.
This keeps the phases clean for energy accounting: ``prefill`` processes every
prompt token in one forward pass and yields the first generated token;
``decode`` runs ``max_gen_len - 1`` single-token steps.  (Meta's reference
instead prefills up to the shortest prompt and teacher-forces the rest inside
the decode loop, which blurs the two phases.)

With ``stop_at_eos=False`` every sequence generates exactly ``max_gen_len``
tokens, so the work per batch is fixed.  With ``stop_at_eos=True`` the loop
stops once every sequence has produced EOS and each output ends before its EOS.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

from llmenergy.inference.model import Transformer

PhaseCallback = Callable[[str, int, int], None]


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per sequence (prompt excluded)
    tokens_in: int
    tokens_out: int
    prefill_duration_s: float
    decode_duration_s: float
    decode_steps: int

    def split_at_eos(self, eos_id: int | None) -> list[tuple[list[int], int]]:
        """Per sequence: its tokens before the first EOS, and how many tokens the GPU
        produced from that EOS on (the EOS included; 0 without one). With
        ``stop_at_eos`` the rows already end before their EOS, so every count is 0;
        without it (the paper's fixed length) the count is the work done past the answer.
        The text of a response is the decode of the first part (``words_out`` counts it);
        ``tokens_out`` stays the length of the whole row."""
        return [split_at_eos(row, eos_id) for row in self.tokens]


def split_at_eos(row: Sequence[int], eos_id: int | None) -> tuple[list[int], int]:
    """``row`` before its first ``eos_id``, and the number of tokens from that EOS on."""
    if eos_id is None or eos_id not in row:
        return list(row), 0
    cut = list(row).index(eos_id)
    return list(row[:cut]), len(row) - cut


def check_batch(prompts: Sequence[Sequence[int]], max_gen_len: int, max_batch_size: int,
                max_seq_len: int) -> tuple[int, int]:
    """``(batch size, longest prompt)``; ``ValueError`` when the prompts do not fit the cache."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt and no empty prompt")
    if max_gen_len < 1:
        raise ValueError(f"max_gen_len must be positive, got {max_gen_len}")
    bsz, longest = len(prompts), max(len(p) for p in prompts)
    if bsz > max_batch_size or longest + max_gen_len > max_seq_len:
        raise ValueError(f"batch {bsz} × {longest} prompt + {max_gen_len} generated tokens "
                         f"exceed the model cache ({max_batch_size} × {max_seq_len})")
    return bsz, longest


def result(prompts: Sequence[Sequence[int]], generated: list[list[int]], eos_id: int | None,
           stamps_ns: tuple[int, int, int], steps: int) -> GenerationResult:
    """The :class:`GenerationResult` of every engine: rows cut before their EOS when
    ``eos_id`` is given; ``stamps_ns`` = prefill start, decode start, decode end."""
    if eos_id is not None:
        generated = [row[: row.index(eos_id)] if eos_id in row else row for row in generated]
    t0, t1, t2 = stamps_ns
    return GenerationResult(
        tokens=generated, tokens_in=sum(len(p) for p in prompts),
        tokens_out=sum(len(g) for g in generated), prefill_duration_s=(t1 - t0) / 1e9,
        decode_duration_s=(t2 - t1) / 1e9, decode_steps=steps)


def sync(device: torch.device) -> None:
    """Wait for the device, so that a timestamp taken next marks the end of the work before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: Transformer) -> torch.device:
    return model.tok_embeddings.weight.device


@torch.inference_mode()
def prefill(model: Transformer, tokens: torch.Tensor,
            n_pad: torch.Tensor | None = None) -> torch.Tensor:
    """Run prompts ``tokens`` [B, P] from position 0; logits of the last position [B, V]."""
    return model(tokens, 0, n_pad=n_pad, last_only=True)[:, -1]


@torch.inference_mode()
def decode_step(model: Transformer, tokens: torch.Tensor, pos: int,
                n_pad: torch.Tensor | None = None) -> torch.Tensor:
    """One token per sequence ``tokens`` [B, 1] at position ``pos``; logits [B, V]."""
    return model(tokens, pos, n_pad=n_pad)[:, -1]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts as one [B, P] tensor padded on the left, and the pad count per row
    (None when all prompts have the same length)."""
    longest = max(len(p) for p in prompts)
    rows = [[pad_id] * (longest - len(p)) + list(p) for p in prompts]
    tokens = torch.tensor(rows, dtype=torch.long, device=device)
    pads = [longest - len(p) for p in prompts]
    n_pad = None if not any(pads) else torch.tensor(pads, dtype=torch.long, device=device)
    return tokens, n_pad


@torch.inference_mode()
def prefill_only(model: Transformer, prompts: list[list[int]]) -> None:
    """The prefill of :func:`generate` alone: ``prompts`` (a batch) left-padded, one
    forward pass into the KV cache, the first token chosen and discarded. No device
    synchronize: the caller times a loop of these (the measured prefill, docs/measurement.md)."""
    check_batch(prompts, 1, model.max_batch_size, model.max_seq_len)
    tokens, n_pad = left_pad(prompts, 0, _device(model))
    prefill(model, tokens, n_pad).argmax(dim=-1)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_gen_len: int, *,
             eos_id: int | None, stop_at_eos: bool,
             on_phase: PhaseCallback | None = None) -> GenerationResult:
    """Greedy decoding of ``prompts`` (a batch) for up to ``max_gen_len`` tokens.

    ``on_phase(phase, start_ns, end_ns)`` is called after each phase with
    ``time.time_ns()`` stamps taken after a device synchronize.
    """
    bsz, longest = check_batch(prompts, max_gen_len, model.max_batch_size, model.max_seq_len)
    device = _device(model)
    tokens, n_pad = left_pad(prompts, 0, device)
    out = torch.empty((bsz, max_gen_len), dtype=torch.long, device=device)
    stop_early = stop_at_eos and eos_id is not None

    sync(device)
    t0 = time.time_ns()
    nxt = prefill(model, tokens, n_pad).argmax(dim=-1)
    out[:, 0] = nxt
    sync(device)
    t1 = time.time_ns()
    if on_phase is not None:
        on_phase("prefill", t0, t1)

    steps = 0
    done = (nxt == eos_id) if stop_early else None
    for i in range(1, max_gen_len):
        if done is not None and bool(done.all()):
            break
        nxt = decode_step(model, nxt[:, None], longest + i - 1, n_pad).argmax(dim=-1)
        out[:, i] = nxt
        steps += 1
        if done is not None:
            done |= nxt == eos_id
    sync(device)
    t2 = time.time_ns()
    if on_phase is not None and steps:
        on_phase("decode", t1, t2)

    return result(prompts, out[:, : steps + 1].tolist(), eos_id if stop_early else None, (t0, t1, t2), steps)
