"""The measured part of a cell on its engine: what each metered phase runs.

:func:`measure` takes a cell whose model is loaded and prompts encoded (:mod:`.worker` does
that) through compile, the warm-up, and per repeat its batches, cycled until their windows
reach ``collector.min_window_s``, then the prefill-only loop. Each phase is an event of the
:class:`~.rank.Recorder` (start and end after a device synchronize, so the collector's samples
join them by time); rank 0 also records each response with its counts. The ranks decide how
many passes to run together (rank 0's clock), so their collectives stay in step.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

from llmenergy.cellfiles import CellSpec
from llmenergy.inference.rank import Recorder, StopFlag

log = logging.getLogger("llmenergy.inference.worker")


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _more(target_s: float, done_s: float, done: int) -> int:
    """How many more passes (of ``done`` so far, ``done_s`` seconds in all) reach ``target_s``:
    0 once reached, else the estimate at the mean pass time (at least 1)."""
    if done_s >= target_s:
        return 0
    per_pass_s = done_s / done if done else 0.0
    return max(1, math.ceil((target_s - done_s) / per_pass_s)) if per_pass_s > 0 else 1


def _rank0s(value: int, device: Any) -> int:
    """Rank 0's ``value`` on every rank: the ranks' loops decide together (their collectives stay in step)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def measure(rec: Recorder, engine: Any, tok: Any, prompts: list[Any], encoded: list[list[int]],
            spec: CellSpec, stop: StopFlag, is_main: bool) -> None:
    """The measured part of a cell on its engine: compile (recorded as a phase of its own;
    none on an engine already compiled for this batch), the warm-up, then per repeat its
    batches, cycled until their windows reach ``collector.min_window_s``, and the
    prefill-only loop, each metered."""
    engine.prepare(on_phase=lambda phase, s, e: rec.event(phase, s, e, n_seqs=spec.cell.batch_size))
    stop.check()
    batch_size = spec.cell.batch_size
    t0 = rec.now_ns()
    engine.generate(encoded[:batch_size], spec.warmup_tokens, eos_id=tok.eos_id, stop_at_eos=False)
    rec.event("warmup", t0, rec.now_ns(), n_seqs=min(len(encoded), batch_size))
    batches = _batches(list(zip(prompts, encoded, strict=True)), batch_size)
    for repeat in range(spec.repeats):
        rec.repeat = repeat
        _repeat_cycles(rec, engine, tok, batches, spec, stop, is_main)
        _prefill_only(rec, engine, [[t for _, t in batch] for batch in batches], spec, stop)
    rec.repeat = rec.batch_index = -1


def _repeat_cycles(rec: Recorder, engine: Any, tok: Any, batches: list[list[Any]], spec: CellSpec,
                   stop: StopFlag, is_main: bool) -> int:
    """One repeat: the cell's batches, then again from the start (a *cycle* each time) until
    the repeat's prefill and decode windows add up to ``collector.min_window_s``; every
    cycle's batches are events and responses like the first's (``batch_index`` runs on
    across cycles: cycle × batches + batch). Whole cycles only, so every prompt counts
    equally. The number of cycles, as the ranks agreed on it (rank 0's clock)."""
    measured_s, cycle, more = 0.0, 0, 1
    while more:
        for _ in range(more):
            for b, batch in enumerate(batches):
                stop.check()
                rec.batch_index = cycle * len(batches) + b
                t_batch = time.monotonic()
                measured_s += _run_batch(rec, engine, tok, batch, spec, is_main, cycle)
                if is_main:
                    log.info("%s: repeat %d/%d, cycle %d, batch %d/%d: %d sequences in %.2f s", spec.cell_id,
                             rec.repeat + 1, spec.repeats, cycle + 1, b + 1, len(batches), len(batch),
                             time.monotonic() - t_batch)
            cycle += 1
        more = _rank0s(_more(spec.collector.min_window_s, measured_s, cycle), rec.device)
    if is_main and cycle > 1:
        log.info("%s: repeat %d: %d cycles of the batches for a %.1f s window (min_window_s %.1f)",
                 spec.cell_id, rec.repeat + 1, cycle, measured_s, spec.collector.min_window_s)
    return cycle


def _prefill_only(rec: Recorder, engine: Any, batches: list[list[list[int]]], spec: CellSpec,
                  stop: StopFlag) -> None:
    """The repeat's measured prefill: every batch's prefill alone (its first token
    discarded), pass after pass over the cell's batches, back to back, for at least
    :meth:`~llmenergy.config.CollectorSpec.prefill_loop_s`; one ``prefill_only`` event over
    the whole loop with every prompt token (``tokens_in``) and sequence (``n_seqs``) it ran."""
    target_s = spec.collector.prefill_loop_s()
    if target_s <= 0:
        return
    stop.check()
    rec.batch_index = -1
    per_pass_in = sum(len(p) for batch in batches for p in batch)
    per_pass_seqs = sum(len(batch) for batch in batches)
    passes, more = 0, 1
    t0 = t1 = rec.now_ns()
    while more:
        for _ in range(more):
            for batch in batches:
                engine.prefill_only(batch)
        passes += more
        t1 = rec.now_ns()
        more = _rank0s(_more(target_s, (t1 - t0) / 1e9, passes), rec.device)
        if more:
            stop.check()
    rec.event("prefill_only", t0, t1, n_seqs=passes * per_pass_seqs, tokens_in=passes * per_pass_in)
    log.info("%s: repeat %d: prefill-only loop, %d pass(es) over %d batch(es) in %.2f s", spec.cell_id,
             rec.repeat + 1, passes, len(batches), (t1 - t0) / 1e9)


def response_counts(row: list[int], eos_id: int | None, decode: Any) -> tuple[str, int, int, int]:
    """A generated row's ``(text, tokens_out, words_out, tokens_after_eos)``: ``tokens_out`` every
    token the GPU produced, the text (graded and counted in words) the decode of the tokens
    before the first EOS, ``tokens_after_eos`` those from that EOS on (docs/measurement.md)."""
    from llmenergy.inference.generate import split_at_eos

    answer, after = split_at_eos(row, eos_id)
    text = decode(answer)
    return text, len(row), len(text.split()), after


def _run_batch(rec: Recorder, engine: Any, tok: Any, batch: list[Any], spec: CellSpec, is_main: bool,
               cycle: int = 0) -> float:
    """Generate one batch, record its phases (and on rank 0 its responses); the seconds
    of its prefill and decode windows."""
    from llmenergy.data.accuracy import is_correct

    prompts = [p for p, _ in batch]
    tokens = [t for _, t in batch]
    n_in = sum(len(t) for t in tokens)
    phases: list[tuple[str, int, int]] = []

    def on_phase(phase: str, start_ns: int, end_ns: int) -> None:
        phases.append((phase, start_ns, end_ns))

    result = engine.generate(tokens, spec.cell.max_gen_len, eos_id=tok.eos_id,
                             stop_at_eos=spec.stop_at_eos, on_phase=on_phase)
    outs = result.tokens
    n_out = sum(len(o) for o in outs)
    for phase, s, e in phases:
        rec.event(phase, s, e, n_seqs=len(batch), tokens_in=n_in if phase == "prefill" else 0,
                  tokens_out=n_out if phase == "decode" else 0)
    measured_s = sum(e - s for phase, s, e in phases if phase in ("prefill", "decode")) / 1e9
    if not is_main:
        return measured_s
    for p, t, o in zip(prompts, tokens, outs, strict=True):
        text, tokens_out, words_out, after = response_counts(o, tok.eos_id, tok.decode)
        rec.responses.append({
            "cell_id": rec.cell_id, "repeat": rec.repeat, "batch_index": rec.batch_index, "prompt_id": p.id,
            "tokens_in": len(t), "tokens_out": tokens_out, "words_out": words_out, "text": text,
            "reference": p.reference, "correct": is_correct(text, p.reference) if p.reference and
            spec.dataset.format == "gsm8k" else None,
            "template": p.template, "tokens_after_eos": after, "cycle": cycle,
        })
    return measured_s
