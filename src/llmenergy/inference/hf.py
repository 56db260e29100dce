"""The ``hf`` engine: HF transformers' ``LlamaForCausalLM.generate`` with its static cache.

An in-matrix anchor (issue 17): the same weights run through the generation
loop most people use, so that the ``reference`` and ``compiled`` numbers can be
set against it.  Needs transformers (``pip install llmenergy[hf]``); one rank
only (the full weights must be in this process).

Model
-----
:func:`hf_config` maps our :class:`~llmenergy.arch.ModelArgs` onto a
``LlamaConfig``; :func:`hf_model` builds ``LlamaForCausalLM`` on ``meta`` and
hands it the parameters of the :class:`~llmenergy.inference.model.Transformer`
that :func:`llmenergy.inference.weights.build` returned (synthetic, Meta or HF
checkpoint alike: an HF checkpoint has already been brought into our layout by
:mod:`llmenergy.inference.checkpoint`).  Every parameter is *shared* (the same
storage) except the query and key projections: HF applies rotary embeddings to
the two halves of a head, Meta to interleaved pairs, so ``wq``/``wk`` are
copied with :func:`~llmenergy.inference.checkpoint.hf_permute` (the inverse of
what the HF checkpoint loader does).  That copy costs ``(n_heads + kv_heads) *
head_dim * dim`` values per layer (2.1 GB for 7B in fp16); HF's static cache is
its own too (the model's ``cache_k``/``cache_v`` buffers stay unused).

Generation
----------
``generate(input_ids, attention_mask, do_sample=False,
cache_implementation="static")`` on the left-padded batch (pad id 0, masked);
HF derives the positions from the mask, which with relative RoPE equals our
padding.  The static cache is sized to the model's ``max_seq_len`` (through
``GenerationConfig.max_cache_len`` where the installed transformers has it,
else by seeding the model's ``_previous_max_cache_length``), so every call has
the same cache shape: one compiled graph per batch size, no recompile when a
later batch has longer prompts.  transformers allocates that cache anew in each
``generate`` call (lazily, in the prefill forward).  EOS: with ``stop_at_eos`` HF stops
once every row has produced ``eos_id`` and we cut each row before its EOS;
otherwise ``eos_token_id`` is None and every row runs ``max_gen_len`` tokens.

Compile: on CUDA (default) transformers' own path — ``torch.compile`` of the
forward with its ``CompileConfig`` (``mode="reduce-overhead"``: CUDA graphs),
used for decode steps only, prefill stays eager.  It compiles lazily, so
:meth:`HFEngine.prepare` runs a short generation at ``max_batch_size`` and
reports it as ``"compile"``; a batch size not warmed yet is warmed at the start
of ``generate`` and reported as ``"compile"`` before ``"prefill"``.  On CPU the
default is no compile (``disable_compile``); ``compile=True`` forces it.

Phases
------
``prefill`` runs from just before ``generate`` is called to the first call of a
logits processor (:class:`_PrefillClock`), which HF makes on the prefill logits
before choosing the first token; it synchronises the device there, once, and
takes the timestamp.  So prefill covers HF's input preparation, cache
allocation and the prompt forward pass.  ``decode`` runs from there to the end
of ``generate`` (after a device synchronise): the first token's selection and
every single-token step, including HF's stopping checks.  Every timestamp is
``time.time_ns()`` after a device synchronise, as in the other engines.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from llmenergy.arch import ModelArgs
from llmenergy.errors import UserError
from llmenergy.inference import tp
from llmenergy.inference.checkpoint import hf_name, hf_permute
from llmenergy.inference.generate import (
    GenerationResult,
    PhaseCallback,
    check_batch,
    left_pad,
    result,
    sync,
)
from llmenergy.inference.model import Transformer

log = logging.getLogger(__name__)

#: new tokens of a warm-up generation: compile, CUDA-graph record, replays
_WARMUP_TOKENS = 5
#: prompt length of a warm-up generation
_WARMUP_PROMPT = 8
#: ModelArgs fields that :func:`hf_config` maps (or that only matter through ``hidden_dim``)
_MAPPED = {"dim", "n_layers", "n_heads", "vocab_size", "n_kv_heads", "multiple_of",
           "ffn_dim_multiplier", "ffn_hidden_dim", "norm_eps", "max_seq_len", "rope_theta", "rope_scaling"}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError("engine hf needs transformers: pip install 'llmenergy[hf]'") from None
    return transformers




def hf_config(args: ModelArgs, *, max_seq_len: int, dtype: torch.dtype) -> Any:
    """A transformers ``LlamaConfig`` with the architecture of ``args``."""
    for field in dataclasses.fields(args):
        if field.name not in _MAPPED and getattr(args, field.name) != field.default:
            raise UserError(f"engine hf: ModelArgs.{field.name}={getattr(args, field.name)!r} "
                            f"has no LlamaConfig mapping yet")
    t = _transformers()
    scaling = None
    if args.rope_scaling is not None:
        s = args.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_seq_len}
    return t.LlamaConfig(
        rope_scaling=scaling,
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, max_position_embeddings=max_seq_len, hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, use_cache=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa",
        dtype=dtype, torch_dtype=dtype)


def hf_model(model: Transformer) -> Any:
    """``LlamaForCausalLM`` over ``model``'s weights (shared, except permuted copies of wq/wk)."""
    if tp.mp_world_size() != 1:
        raise UserError(f"engine hf: runs one rank only, not {tp.mp_world_size()} shards")
    t = _transformers()
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    weight = model.tok_embeddings.weight
    config = hf_config(model.args, max_seq_len=model.max_seq_len, dtype=weight.dtype)
    with torch.device("meta"):
        hf = t.LlamaForCausalLM(config)
    rotary = {"attention.wq.weight": model.args.n_heads, "attention.wk.weight": model.args.kv_heads}
    for name, param in model.named_parameters():
        module_name, _, attr = hf_name(name).rpartition(".")
        heads = next((h for suffix, h in rotary.items() if name.endswith(suffix)), None)
        if heads is not None:
            param = torch.nn.Parameter(hf_permute(param.detach(), heads).contiguous(),
                                       requires_grad=False)
        setattr(hf.get_submodule(module_name), attr, param)
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(weight.device)
    left = [n for n, p in [*hf.named_parameters(), *hf.named_buffers()] if p.is_meta]
    if left:
        raise RuntimeError(f"engine hf: no weights for {', '.join(left)}")
    return hf.eval()


class _PrefillClock:
    """Logits processor that stamps the end of prefill (its first call) after a device sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t_ns: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.t_ns is None:
            sync(self.device)
            self.t_ns = time.time_ns()
        return scores


class HFEngine:
    """Greedy generation through transformers' ``generate`` (see the module doc)."""

    name = "hf"

    def __init__(self, model: Transformer, *, cache_dir: str | Path | None = None,
                 compile: bool | None = None) -> None:
        t = _transformers()
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.max_batch_size = model.max_batch_size
        self.max_seq_len = model.max_seq_len
        self.compile = self.device.type == "cuda" if compile is None else compile
        if self.compile and cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
        self.hf = hf_model(model)
        self._gen_config = t.GenerationConfig
        self._compile_config = t.CompileConfig() if self.compile else None
        if self._compile_config is not None and self.device.type != "cuda":
            self._compile_config._compile_all_devices = True
        self._fixed_cache_len = "max_cache_len" in t.GenerationConfig().__dict__
        # transformers without GenerationConfig.max_cache_len sizes a new static cache by the
        # largest one so far: start that at max_seq_len, so the first call already has the final shape
        self.hf._previous_max_cache_length = self.max_seq_len
        self._ready: set[int] = set()
        log.info("engine hf: transformers %s, compile %s", t.__version__, self.compile)

    def _config(self, max_new_tokens: int, eos_id: int | None, **extra: Any) -> Any:
        kw: dict[str, Any] = dict(
            do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1,
            cache_implementation="static", eos_token_id=eos_id, pad_token_id=0,
            bos_token_id=None, temperature=None, top_p=None, top_k=None, **extra)
        if self._fixed_cache_len:
            kw["max_cache_len"] = self.max_seq_len
        if self._compile_config is None:
            kw["disable_compile"] = True
        else:
            kw["compile_config"] = self._compile_config
        return self._gen_config(**kw)

    def _run(self, prompts: list[list[int]], config: Any, processors: list[Any] | None = None) -> Any:
        t = _transformers()
        tokens, n_pad = left_pad(prompts, 0, self.device)
        mask = torch.ones_like(tokens)
        if n_pad is not None:
            mask = (torch.arange(tokens.shape[1], device=self.device)[None, :]
                    >= n_pad[:, None]).long()
        return self.hf.generate(tokens, attention_mask=mask, generation_config=config,
                                logits_processor=t.LogitsProcessorList(processors or []))

    # ------------------------------------------------------------------ compiling

    @torch.inference_mode()
    def warm(self, bsz: int, on_phase: PhaseCallback | None = None) -> None:
        """With compile: one short generation at batch ``bsz`` (compile and capture), as ``"compile"``."""
        if bsz in self._ready:
            return
        self._ready.add(bsz)
        if not self.compile:
            return
        new = min(_WARMUP_TOKENS, self.max_seq_len - 1)
        prompts = [[1] * max(1, min(_WARMUP_PROMPT, self.max_seq_len - new))] * bsz
        sync(self.device)
        t0 = time.time_ns()
        self._run(prompts, self._config(new, None))
        sync(self.device)
        t1 = time.time_ns()
        log.info("engine hf: warmed batch %d (compile) in %.1f s", bsz, (t1 - t0) / 1e9)
        if on_phase is not None:
            on_phase("compile", t0, t1)

    def prepare(self, on_phase: PhaseCallback | None = None) -> None:
        """Compile for ``max_batch_size`` before any measured generation (nothing without compile)."""
        self.warm(self.max_batch_size, on_phase)

    # ------------------------------------------------------------------ generation

    def _check(self, prompts: list[list[int]], max_gen_len: int) -> tuple[int, int]:
        return check_batch(prompts, max_gen_len, self.max_batch_size, self.max_seq_len)

    @torch.inference_mode()
    def first_logits(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, V] of prefill and of the first decode step (fed the greedy token)."""
        bsz, _ = self._check(prompts, 2)
        self.warm(bsz)
        out = self._run(prompts, self._config(2, None, return_dict_in_generate=True,
                                              output_logits=True))
        return out.logits[0], out.logits[1]

    @torch.inference_mode()
    def prefill_only(self, prompts: list[list[int]]) -> None:
        """HF's prefill alone: ``generate`` of one new token (input preparation, static
        cache allocation, the eager prompt forward pass, the first token's choice), which
        is what this engine's ``prefill`` phase spans; its token is discarded."""
        self._check(prompts, 1)
        self._run(prompts, self._config(1, None))

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_gen_len: int, *, eos_id: int | None,
                 stop_at_eos: bool, on_phase: PhaseCallback | None = None) -> GenerationResult:
        """Same contract as :func:`llmenergy.inference.generate.generate` (plus ``"compile"``
        reported first when this batch size was not warmed yet)."""
        bsz, longest = self._check(prompts, max_gen_len)
        self.warm(bsz, on_phase)
        stop_early = stop_at_eos and eos_id is not None
        clock = _PrefillClock(self.device)
        config = self._config(max_gen_len, eos_id if stop_early else None)
        sync(self.device)
        t0 = time.time_ns()
        out = self._run(prompts, config, [clock])
        sync(self.device)
        t2 = time.time_ns()
        t1 = clock.t_ns if clock.t_ns is not None else t2
        new = out[:, longest:]
        steps = max(0, new.shape[1] - 1)
        if on_phase is not None:
            on_phase("prefill", t0, t1)
            if steps:
                on_phase("decode", t1, t2)
        return result(prompts, new.tolist(), eos_id if stop_early else None, (t0, t1, t2), steps)
