"""The ``compiled`` engine: static KV cache, one decode step under torch.compile (CUDA graphs).

It runs the :class:`~llmenergy.inference.model.Transformer` that
:func:`llmenergy.inference.weights.build` returns, reading its parameters in place and
writing into its per-layer ``cache_k``/``cache_v`` buffers (one per layer: a single buffer
made a compiled graph copy it every layer); a batch of ``B < max_batch_size`` rows uses
their first ``B`` rows.  docs/precision-measurements.md has the measurements behind each choice.

Decode step (the part that matters for speed):

- one token per row, attention (``F.scaled_dot_product_attention``) over the first K keys
  of the cache, masked ``key <= position`` and ``key >= pad`` on the device.  K is the
  smallest of at most 8 key lengths (:func:`key_buckets`) that covers the position, so a
  step reads the keys written so far rounded up, not the whole cache (7B at batch 64 with
  320 positions: 10.7 GB of cache against 13.5 of weights).  K is an unbacked symbol of the
  one compiled graph; :meth:`CompiledEngine.warm` records a CUDA graph per K.
  ``LLMENERGY_KEY_BUCKETS=0``: the whole cache, one static shape (as before session 13);
- the position is a device tensor incremented in place, greedy argmax on the device, the
  token fed back without leaving it: no host sync per token (with ``stop_at_eos`` the
  "all finished?" check syncs every ``eos_check_every`` steps, so up to that many minus
  one extra steps may run; the returned tokens are the same); RoPE in real arithmetic;
- with shards > 1, functional collectives, which can sit inside a graph.

Linear layers (:mod:`llmenergy.inference.quant`): QKV and gate/up fused per shard, for
int8/fp8 quantised per local output channel (one engine per model precision).  On CUDA
the step compiles with ``mode="reduce-overhead"`` (Inductor, captured as a CUDA graph and
replayed; the caches are static addresses, not copied).  int8/fp8 on the default ``triton``
backend (and fp16/bf16 at batch 1 if asked: ``quant.use_gemv``) call our kernel through an
opaque op; the ``torch``/``torchao`` backends add Inductor options (fewer after a failed compile).

Prefill (every prompt token, variable length): on CUDA (``compile_prefill``;
``LLMENERGY_COMPILE_PREFILL=0`` turns it off) one graph for one transformer block,
:meth:`_block`, the prompt length symbolic, the layer's weights and caches its inputs,
called once per layer, without CUDA graphs (an eager 7B prefill is bound by the host).
Compiled in :meth:`CompiledEngine.warm` per batch size and then called under the stance
``eager_on_recompile``: what the graph does not cover (a one-token prompt, a batch size
not warmed) runs eagerly, so nothing compiles inside a measured window.

On CPU the default is the same code path without compiling (Inductor's C++ compile takes
tens of seconds on two cores and buys nothing there); ``compile=True`` uses torch.compile's
default mode, and slow tests check it gives the same tokens, over gloo at two ranks too,
without recompiling.  Compiling happens in :meth:`CompiledEngine.prepare` (for
``max_batch_size``) or, for a new batch size, at the start of ``generate``; either way it
is the phase ``"compile"``.  ``cache_dir`` sets ``TORCHINDUCTOR_CACHE_DIR`` before the
first compile so that later processes reuse Inductor's and Triton's kernels.
"""
from __future__ import annotations

import bisect
import functools
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.nn.attention import sdpa_kernel

from llmenergy.errors import UserError
from llmenergy.inference import narrow_mm, quant, tp
from llmenergy.inference.generate import (GenerationResult, PhaseCallback, check_batch, left_pad,
                                          result, sync)
from llmenergy.inference.model import SDPA_BACKENDS, Transformer, attention_mask

log = logging.getLogger(__name__)

# all_gather_tensor is deprecated in torch 2.13 in favour of all_gather_single (same arguments)
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor

Caches = list[torch.Tensor]  # [k0, v0, k1, v1, ...], each [B, kv_heads, max_seq_len, head_dim]

#: ``LLMENERGY_COMPILE_PREFILL=0|1``: the compiled prefill off or on where the caller does not
#: say (default: on where the decode step compiles on CUDA)
PREFILL_ENV = "LLMENERGY_COMPILE_PREFILL"
#: compiled decode calls made by prepare: compile, CUDA-graph record, first replay
_WARMUP_CALLS = 3
#: ``LLMENERGY_KEY_BUCKETS=0``: every decode step attends over the whole cache (one bucket)
BUCKETS_ENV = "LLMENERGY_KEY_BUCKETS"
#: the decode step's key lengths: multiples of at least this many keys, at most this many
KEY_BUCKET_MIN, MAX_KEY_BUCKETS = 64, 8


def key_buckets(max_seq_len: int, on: bool = True) -> list[int]:
    """The key lengths a decode step attends over: the smallest that covers the position is
    used, so a step reads the keys written so far rounded up, not the whole cache.  At most
    :data:`MAX_KEY_BUCKETS` (one CUDA graph each), multiples of :data:`KEY_BUCKET_MIN` keys,
    the last ``max_seq_len``; ``on=False``: ``[max_seq_len]``."""
    if not on:
        return [max_seq_len]
    width = -(-max_seq_len // MAX_KEY_BUCKETS)
    width = max(KEY_BUCKET_MIN, -(-width // KEY_BUCKET_MIN) * KEY_BUCKET_MIN)
    return [*range(width, max_seq_len, width), max_seq_len]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [B, S, H, D] by angles given as cos/sin [1, S, 1, D/2]."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)


class CompiledEngine:
    """Greedy generation on a static KV cache with a compiled decode step (see the module doc)."""

    name = "compiled"

    def __init__(self, model: Transformer, *, cache_dir: str | Path | None = None,
                 compile: bool | None = None, eos_check_every: int = 16,
                 precision: str = "fp16", compile_prefill: bool | None = None) -> None:
        if eos_check_every < 1:
            raise UserError(f"eos_check_every must be positive, got {eos_check_every}")
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.dtype = model.tok_embeddings.weight.dtype
        self.max_batch_size = model.max_batch_size
        self.max_seq_len = model.max_seq_len
        self.eos_check_every = eos_check_every
        self.compile = self.device.type == "cuda" if compile is None else compile
        if compile_prefill is None:  # on by default on CUDA; LLMENERGY_COMPILE_PREFILL=0|1
            compile_prefill = os.environ.get(PREFILL_ENV, "1" if self.device.type == "cuda" else "0") != "0"
        self.compile_prefill = self.compile and compile_prefill
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.shards = tp.mp_world_size()
        self.precision = precision
        self.linears, self.quant_backend = quant.prepare(model, precision)
        #: fp16/bf16 at batch 1 through our GEMV (opt-in: ``quant.use_gemv``), not cuBLAS
        self.dense_gemv = self.compile and quant.use_gemv(self.linears, self.device)
        if self.compile:
            for lin in self.linears:
                for mod in lin.modules():
                    for buf in mod.buffers():
                        torch._dynamo.mark_static_address(buf)
        self._group = None
        if self.shards > 1:
            from fairscale.nn.model_parallel.initialize import get_model_parallel_group
            self._group = get_model_parallel_group()
        freqs = model.freqs_cis  # complex [max_seq_len, head_dim/2], float32 parts
        self._cos, self._sin = freqs.real.contiguous(), freqs.imag.contiguous()
        self._keys = torch.arange(self.max_seq_len, device=self.device)
        if self.compile:
            for t in (self._cos, self._sin, self._keys):
                torch._dynamo.mark_static_address(t)
        # the decode step's key lengths (:func:`key_buckets`; ``LLMENERGY_KEY_BUCKETS=0``: one)
        self._set_buckets(key_buckets(self.max_seq_len, os.environ.get(BUCKETS_ENV, "1") != "0"))
        self._caches: dict[int, Caches] = {}
        self.ready_batches: set[int] = set()  # warmed: with compile, a Dynamo entry each
        self._prefill_ready: set[int] = set()
        self._tokens: dict[int, torch.Tensor] = {}
        self._step = self._decode
        self._extra: dict[str, object] = {}
        #: the one-row narrow_mm config per weight shape tuned at warm-up (provenance)
        self.gemv_configs: dict[str, str] = {}
        if self.compile:
            if self.cache_dir is not None:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir)
            self._compile_with(quant.compile_options(self.quant_backend, self.device))
        # the compiled prefill: one graph for every block, the prompt length symbolic
        self._block_graph = (torch.compile(self._block, fullgraph=True, dynamic=False)
                             if self.compile_prefill else self._block)

    def _set_buckets(self, buckets: list[int]) -> None:
        """Attend over ``buckets`` key lengths (:attr:`key_buckets`), each a view of the key
        positions whose length is unbacked in the compiled step (docs/precision.md)."""
        self.key_buckets = buckets
        if len(buckets) == 1:  # the whole cache: the tensor itself, a static input as before
            self._key_views = {self.max_seq_len: self._keys}
            return
        self._key_views = {n: self._keys[:n] for n in buckets}
        for view in self._key_views.values() if self.compile else ():
            torch._dynamo.decorators.mark_unbacked(view, 0)

    def _keys_for(self, position: int) -> torch.Tensor:
        """The key positions a decode step writing ``position`` attends over (the bucket)."""
        return self._key_views[self.key_buckets[bisect.bisect_left(self.key_buckets, position + 1)]]

    def _compile_with(self, extra: dict[str, object]) -> None:
        """Compile the decode step with Inductor options ``extra`` (the narrow weights')."""
        self._extra = extra
        if extra:  # reduce-overhead (CUDA graphs) plus the options
            self._step = torch.compile(self._decode, options={"triton.cudagraphs": True, **extra},
                                       fullgraph=True, dynamic=False)
            return
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self._step = torch.compile(self._decode, mode=mode, fullgraph=True, dynamic=False)

    # ------------------------------------------------------------------ model pieces

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self._group is None:
            return x
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", self._group))

    def _all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        if self._group is None:
            return x
        # concatenation along the last dim in rank order, done as a gather along dim 0
        gathered = _all_gather(x.movedim(-1, 0).contiguous(), 0, self._group)
        return funcol.wait_tensor(gathered).movedim(0, -1)

    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                 n_keys: int | None, caches: Caches, tail: int | None = None,
                 wide: bool = False) -> torch.Tensor:
        """Float32 logits of the last position [B, V] (of the last ``tail`` [B, tail, V]) for
        ``tokens`` [B, S] at positions ``pos`` [S].

        Keys and values go into ``caches`` at ``pos``; attention reads the first ``n_keys``
        (None: ``S``, a prefill).  ``wide``: each block through :attr:`_block_graph` (the
        compiled prefill: one graph for every block).
        """
        m = self.model
        block = self._block_graph if wide else self._block
        h, cos, sin = self._embed(tokens, pos)
        for i, layer in enumerate(m.layers):
            h = block(h, layer, self.linears[i], cos, sin, pos, mask, n_keys,
                      caches[2 * i], caches[2 * i + 1])
        h = m.norm(h[:, -1] if tail is None else h[:, -tail:])
        return self._all_gather_last(F.linear(h, m.output.weight)).float()

    def _embed(self, tokens: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first block's input for ``tokens`` [B, S] and the rotations at ``pos`` [S]."""
        h = self._all_gather_last(F.embedding(tokens, self.model.tok_embeddings.weight))
        return h, self._cos[pos][None, :, None, :], self._sin[pos][None, :, None, :]

    def _block(self, h: torch.Tensor, layer: nn.Module, lin: quant.Linears, cos: torch.Tensor,
               sin: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
               n_keys: int | None, ck: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        """One transformer block on ``h`` [B, S, D] (see :meth:`_forward`)."""
        a = layer.attention
        bsz, seqlen = h.shape[0], h.shape[1]
        x = layer.attention_norm(h)
        q, k, v = lin.qkv(x).split(lin.qkv_sizes, dim=-1)
        q = q.unflatten(-1, (a.n_local_heads, a.head_dim))
        k = k.unflatten(-1, (a.n_local_kv_heads, a.head_dim))
        v = v.unflatten(-1, (a.n_local_kv_heads, a.head_dim))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        ck.index_copy_(2, pos, k.transpose(1, 2))
        cv.index_copy_(2, pos, v.transpose(1, 2))
        end = seqlen if n_keys is None else n_keys
        keys, values = ck[:, :, :end], cv[:, :, :end]
        rep = a.n_local_heads // a.n_local_kv_heads
        if rep > 1:
            keys = keys.repeat_interleave(rep, dim=1)
            values = values.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        h = h + self._all_reduce(lin.wo(out))
        x = layer.ffn_norm(h)
        gate, up = lin.gate_up(x).split(lin.hidden, dim=-1)
        return h + self._all_reduce(lin.w2(F.silu(gate) * up))

    def _decode(self, token: torch.Tensor, pos: torch.Tensor, n_pad: torch.Tensor,
                caches: Caches, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: ``token`` [B, 1] at ``pos`` [1], attending over the key positions ``keys``
        [K] (the first K of the cache: a bucket, :meth:`_keys_for`) → (next token [B],
        logits [B, V])."""
        n_keys = keys.shape[0]
        if len(self.key_buckets) > 1:  # unbacked when compiled: its range, for slices and attention
            torch._check(n_keys >= 2)
            torch._check(n_keys <= self.max_seq_len)
        k = keys[None, :]
        mask = (k <= pos) & (k >= n_pad[:, None])
        logits = self._forward(token, pos, mask[:, None, None, :], n_keys, caches)
        return logits.argmax(dim=-1), logits

    def _prefill(self, tokens: torch.Tensor, n_pad: torch.Tensor | None,
                 caches: Caches) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        pos = torch.arange(seqlen, device=self.device)
        wide = self.compile_prefill and bsz in self._prefill_ready and seqlen > 1
        if wide and n_pad is None:  # always a [B, 1, S, S] mask: one graph
            n_pad = self._zero_pads(bsz)
        mask = attention_mask(0, seqlen, n_pad, self.device)
        with sdpa_kernel(SDPA_BACKENDS):  # as the reference: no cuDNN (it re-plans per length)
            if wide:
                with torch.compiler.set_stance("eager_on_recompile"):
                    return self._forward(tokens, pos, mask, None, caches, wide=True)
            return self._forward(tokens, pos, mask, seqlen, caches)

    def prefill_mode(self, bsz: int) -> str:
        """``"compiled"`` where a prefill of batch ``bsz`` runs the block graph (prompts of
        two tokens or more), else ``"eager"``."""
        return "compiled" if bsz in self._prefill_ready else "eager"

    def load_provenance(self, bsz: int) -> dict[str, object]:
        """A cell of batch ``bsz``'s ``provenance.load``: its prefill's path, its decode's key
        lengths, whether its 16-bit linears took our GEMV (one row), the GEMV configs tuned."""
        return {"prefill": self.prefill_mode(bsz), "decode_key_buckets": self.key_buckets,
                **({"dense_gemv": self.dense_gemv and bsz == 1} if self.quant_backend == "dense" else {}),
                **({"gemv_configs": self.gemv_configs} if self.gemv_configs else {})}

    def _zero_pads(self, bsz: int) -> torch.Tensor:
        return torch.zeros(bsz, dtype=torch.long, device=self.device)

    def _warm_prefill(self, bsz: int, caches: Caches) -> None:
        """Compile the prefill's block graph for batch ``bsz`` (prompt length symbolic); on
        failure log it and keep the eager prefill for this batch size."""
        longest = self.max_seq_len - 1  # a prompt leaves room for one generated token
        if longest < 3:
            return
        # any length from 2 serves (the graph is symbolic in it; 0 and 1 Dynamo specialises)
        seqlen = min(longest, 19)
        tokens = torch.zeros((bsz, seqlen), dtype=torch.long, device=self.device)
        pos = torch.arange(seqlen, device=self.device)
        mask = attention_mask(0, seqlen, self._zero_pads(bsz), self.device)
        h, cos, sin = self._embed(tokens, pos)
        for t, dims in ((h, (1,)), (cos, (1,)), (sin, (1,)), (pos, (0,)), (mask, (2, 3))):
            torch._dynamo.mark_dynamic(t, dims)
        try:
            with sdpa_kernel(SDPA_BACKENDS):
                for i, layer in enumerate(self.model.layers):
                    self._block_graph(h, layer, self.linears[i], cos, sin, pos, mask, None,
                                      caches[2 * i], caches[2 * i + 1])
        except Exception as exc:  # noqa: BLE001 - an eager prefill is slower, not wrong
            log.warning("compiling the prefill for batch %d failed (%s: %s); it runs eagerly",
                        bsz, type(exc).__name__, str(exc)[:300])
            return
        self._prefill_ready.add(bsz)

    # ------------------------------------------------------------------ caches and compiling

    def caches(self, bsz: int) -> Caches:
        """The per-layer caches of a batch of ``bsz``: views of the model's own buffers."""
        if bsz not in self._caches:
            views = []
            for layer in self.model.layers:
                views += [layer.attention.cache_k[:bsz], layer.attention.cache_v[:bsz]]
            for t in views:
                if t.dtype != self.dtype:
                    raise UserError(f"KV cache dtype {t.dtype} differs from the weights' {self.dtype}")
                if self.compile:
                    torch._dynamo.mark_static_address(t)
            self._caches[bsz] = views
        return self._caches[bsz]

    def _token(self, bsz: int) -> torch.Tensor:
        """The [bsz, 1] input token buffer: always the same strides, so no recompile."""
        if bsz not in self._tokens:
            self._tokens[bsz] = torch.zeros((bsz, 1), dtype=torch.long, device=self.device)
            if self.compile:
                torch._dynamo.mark_static_address(self._tokens[bsz])
        return self._tokens[bsz]

    @torch.inference_mode()
    def warm(self, bsz: int, on_phase: PhaseCallback | None = None) -> None:
        """Compile (and on CUDA capture) the decode step for batch ``bsz``, and the prefill
        (``compile_prefill``); report ``"compile"``."""
        if bsz in self.ready_batches:
            return
        caches = self.caches(bsz)
        sync(self.device)
        t0 = time.time_ns()
        if not self.ready_batches:  # the first batch size: our kernels, tuned once for the engine
            agree = (None if self._group is None else
                     functools.partial(tp.slowest, group=self._group, device=self.device))
            if n := quant.warm_kernels(self.linears, self.dtype, agree):
                log.info("warmed %d narrow_mm kernel variant(s) for prefill and decode (Triton compiles each once)", n)
                self.gemv_configs = narrow_mm.tuned(quant.NARROW_DTYPES.get(self.precision, self.dtype))
        if self.compile:
            token = self._token(bsz).zero_()
            pos = torch.zeros(1, dtype=torch.long, device=self.device)
            n_pad = torch.zeros(bsz, dtype=torch.long, device=self.device)
            while True:
                try:
                    self._warm_calls(token, pos, n_pad, caches)
                    break
                except Exception as exc:  # noqa: BLE001 - the GEMM-template options are unverified
                    if len(self.key_buckets) > 1 and not self.ready_batches:
                        log.warning("compiling the decode step with key lengths %s failed (%s: %s); "
                                    "attending over the whole cache", self.key_buckets,
                                    type(exc).__name__, str(exc)[:300])
                        self._set_buckets([self.max_seq_len])
                        self._compile_with(self._extra)
                        continue
                    if not self._extra:
                        raise
                    # first without the GEMM-template options, keeping the batch-1 ones
                    fewer = {k: v for k, v in self._extra.items() if k in quant.NARROW_GEMV_OPTIONS}
                    fewer = {} if fewer == self._extra else fewer
                    log.warning("compiling with %s failed (%s: %s); compiling with %s",
                                self._extra, type(exc).__name__, exc, fewer or "no extra options")
                    self._compile_with(fewer)
        sync(self.device)
        t_decode = time.time_ns()
        if self.compile_prefill:
            self._warm_prefill(bsz, caches)
        sync(self.device)
        t1 = time.time_ns()
        self.ready_batches.add(bsz)
        if self.compile:
            log.info("compiled the decode step for batch %d in %.1f s%s", bsz, (t_decode - t0) / 1e9,
                     f", the prefill's block in {(t1 - t_decode) / 1e9:.1f} s"
                     if bsz in self._prefill_ready else "")
            if on_phase is not None:
                on_phase("compile", t0, t1)

    def _warm_calls(self, token: torch.Tensor, pos: torch.Tensor, n_pad: torch.Tensor,
                    caches: Caches) -> None:
        for keys in self._key_views.values():  # one CUDA graph per key length
            for _ in range(_WARMUP_CALLS):  # writes position 0, which prefill overwrites
                self._mark_step()
                self._step(token, pos, n_pad, caches, keys)

    def prepare(self, on_phase: PhaseCallback | None = None) -> None:
        """Compile for ``max_batch_size`` before any measured generation."""
        self.warm(self.max_batch_size, on_phase)

    def _mark_step(self) -> None:
        if self.compile and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    # ------------------------------------------------------------------ generation

    def _check(self, prompts: list[list[int]], max_gen_len: int) -> tuple[int, int]:
        return check_batch(prompts, max_gen_len, self.max_batch_size, self.max_seq_len)

    @torch.inference_mode()
    def first_logits(self, prompts: list[list[int]], first_token: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, V] of prefill and of the first decode step, fed ``first_token`` [B]
        when given (to compare engines on the same input), else this engine's greedy token."""
        bsz, longest = self._check(prompts, 2)
        self.warm(bsz)
        caches = self.caches(bsz)
        tokens, n_pad = left_pad(prompts, 0, self.device)
        pre = self._prefill(tokens, n_pad, caches)
        pads = n_pad if n_pad is not None else torch.zeros(bsz, dtype=torch.long, device=self.device)
        pos = torch.full((1,), longest, dtype=torch.long, device=self.device)
        token = self._token(bsz)
        token.copy_((pre.argmax(-1) if first_token is None else first_token.to(self.device))[:, None])
        self._mark_step()
        _, step = self._step(token, pos, pads, caches, self._keys_for(longest))
        return pre, step.clone()

    @torch.inference_mode()
    def tail_logits(self, tokens: torch.Tensor, n_pad: torch.Tensor | None, tail: int) -> torch.Tensor:
        """Float32 logits [B, tail, V] of the last ``tail`` positions of the left-padded
        prompts ``tokens`` [B, S], through this engine's (eager) prefill and its linears."""
        seqlen = tokens.shape[1]
        caches = self.caches(tokens.shape[0])
        mask = attention_mask(0, seqlen, n_pad, self.device)
        with sdpa_kernel(SDPA_BACKENDS):
            return self._forward(tokens, torch.arange(seqlen, device=self.device), mask, seqlen,
                                 caches, tail=tail)

    @torch.inference_mode()
    def prefill_only(self, prompts: list[list[int]]) -> None:
        """The prefill of :meth:`generate` alone, its first token discarded; no sync and no
        compile (compiled only where :meth:`warm` compiled it, else eager)."""
        bsz, _ = self._check(prompts, 1)
        tokens, n_pad = left_pad(prompts, 0, self.device)
        self._prefill(tokens, n_pad, self.caches(bsz)).argmax(dim=-1)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_gen_len: int, *, eos_id: int | None,
                 stop_at_eos: bool, on_phase: PhaseCallback | None = None) -> GenerationResult:
        """Same contract as :func:`llmenergy.inference.generate.generate` (plus ``"compile"``
        reported first when this batch size was not compiled yet)."""
        bsz, longest = self._check(prompts, max_gen_len)
        self.warm(bsz, on_phase)
        caches = self.caches(bsz)
        tokens, n_pad = left_pad(prompts, 0, self.device)
        pads = n_pad if n_pad is not None else torch.zeros(bsz, dtype=torch.long, device=self.device)
        out = torch.empty((bsz, max_gen_len), dtype=torch.long, device=self.device)
        pos = torch.full((1,), longest, dtype=torch.long, device=self.device)
        stop_early = stop_at_eos and eos_id is not None

        sync(self.device)
        t0 = time.time_ns()
        out[:, 0] = self._prefill(tokens, n_pad, caches).argmax(dim=-1)
        sync(self.device)
        t1 = time.time_ns()
        if on_phase is not None:
            on_phase("prefill", t0, t1)

        steps = 0
        token = self._token(bsz)
        token.copy_(out[:, :1])
        done = (out[:, 0] == eos_id) if stop_early else None
        for i in range(1, max_gen_len):
            if done is not None and (i - 1) % self.eos_check_every == 0 and bool(done.all()):
                break
            self._mark_step()
            nxt, _ = self._step(token, pos, pads, caches, self._keys_for(longest + i - 1))
            out[:, i] = nxt
            token.copy_(nxt[:, None])
            pos += 1
            steps += 1
            if done is not None:
                done |= out[:, i] == eos_id
        sync(self.device)
        t2 = time.time_ns()
        if on_phase is not None and steps:
            on_phase("decode", t1, t2)

        return result(prompts, out[:, : steps + 1].tolist(), eos_id if stop_early else None,
                      (t0, t1, t2), steps)
