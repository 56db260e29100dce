"""Inference engines: the same model, weights and sharding, run different ways.

``reference``
    :func:`llmenergy.inference.generate.generate`, eager, as Meta's reference
    (the engine the paper measured).
``compiled``
    :class:`llmenergy.inference.compiled.CompiledEngine`: static KV cache, decode
    step under torch.compile (CUDA graphs on CUDA).
``hf``
    :class:`llmenergy.inference.hf.HFEngine`: HF transformers'
    ``LlamaForCausalLM.generate`` with its static cache and (on CUDA) its
    compile, as an anchor; one rank only, needs ``pip install llmenergy[hf]``.

All wrap a :class:`~llmenergy.inference.model.Transformer` from
:func:`llmenergy.inference.weights.build` (``hf`` shares every weight but copies ``wq``/``wk`` into HF's rotary layout)::

    engine = make_engine("compiled", model, cache_dir=cell_dir / "inductor")
    engine.prepare(on_phase)            # reports "compile" (nothing for reference)
    result = engine.generate(prompts, max_gen_len, eos_id=eos, stop_at_eos=False,
                             on_phase=on_phase)   # "compile"?, "prefill", "decode"
    engine.prefill_only(prompts)        # the same prefill, its first token discarded; no sync

``generate`` has the contract of :func:`~llmenergy.inference.generate.generate`.
The compiled and hf engines compile per batch size; a batch size that ``prepare`` did
not cover (a short last batch) is compiled at the start of ``generate`` and
reported as a ``"compile"`` phase before ``"prefill"``.  The names and the
torch-free feasibility check live in :mod:`llmenergy.arch` (``ENGINES``,
``engine_problem``) for the planner.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from llmenergy.arch import ENGINES, PRECISION_DTYPE, engine_problem, precision_problem
from llmenergy.errors import UserError
from llmenergy.inference import generate as G
from llmenergy.inference.model import Transformer

if TYPE_CHECKING:
    from llmenergy.cellfiles import CellSpec

__all__ = ["ENGINES", "Engine", "ReferenceEngine", "cell_engine", "engine_problem", "make_engine"]


class Engine(Protocol):
    name: str

    def prepare(self, on_phase: G.PhaseCallback | None = None) -> None: ...

    def generate(self, prompts: list[list[int]], max_gen_len: int, *, eos_id: int | None,
                 stop_at_eos: bool, on_phase: G.PhaseCallback | None = None) -> G.GenerationResult: ...

    def prefill_only(self, prompts: list[list[int]]) -> None: ...

    def first_logits(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]: ...


class ReferenceEngine:
    """Meta-style eager generation (:func:`llmenergy.inference.generate.generate`)."""

    name = "reference"

    def __init__(self, model: Transformer) -> None:
        self.model = model

    @property
    def max_batch_size(self) -> int:
        return int(self.model.max_batch_size)  # the KV cache's, which a packed cell resizes

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def prepare(self, on_phase: G.PhaseCallback | None = None) -> None:
        """Nothing to compile."""

    @torch.inference_mode()
    def tail_logits(self, tokens: torch.Tensor, n_pad: torch.Tensor | None, tail: int) -> torch.Tensor:
        """Logits [B, tail, V] of the last ``tail`` positions of the left-padded prompts
        ``tokens`` [B, S]: the model's own prefill (:mod:`llmenergy.inference.fidelity`)."""
        return self.model(tokens, 0, n_pad=n_pad, tail=tail)

    def generate(self, prompts: list[list[int]], max_gen_len: int, *, eos_id: int | None,
                 stop_at_eos: bool, on_phase: G.PhaseCallback | None = None) -> G.GenerationResult:
        return G.generate(self.model, prompts, max_gen_len, eos_id=eos_id,
                          stop_at_eos=stop_at_eos, on_phase=on_phase)

    def prefill_only(self, prompts: list[list[int]]) -> None:
        """This engine's prefill of ``prompts`` alone (:func:`~llmenergy.inference.generate.prefill_only`)."""
        G.prefill_only(self.model, prompts)

    @torch.inference_mode()
    def first_logits(self, prompts: list[list[int]], first_token: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, V] of prefill and of the first decode step, fed ``first_token`` [B]
        when given (to compare engines on the same input), else the greedy token."""
        device = self.model.tok_embeddings.weight.device
        tokens, n_pad = G.left_pad(prompts, 0, device)
        pre = G.prefill(self.model, tokens, n_pad)
        fed = pre.argmax(-1) if first_token is None else first_token.to(device)
        step = G.decode_step(self.model, fed[:, None], tokens.shape[1], n_pad)
        return pre, step


def make_engine(name: str, model: Transformer, *, max_batch_size: int | None = None,
                max_seq_len: int | None = None, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, cache_dir: str | Path | None = None,
                compile: bool | None = None, precision: str | None = None) -> Engine:
    """Engine ``name`` over ``model``.

    The batch size, sequence length, device and dtype are the model's (its KV
    cache and weights); when given they must match.  ``cache_dir``: Inductor's
    cache directory (compiled, hf).  ``compile``: compiled and hf; default True
    on CUDA, False on CPU (see :mod:`llmenergy.inference.compiled`,
    :mod:`llmenergy.inference.hf`).  ``precision`` (the cell's, :data:`llmenergy.arch.PRECISIONS`;
    default: bf16 for a bfloat16 model, else fp16): fp16/bf16 need a model of that dtype
    (or float32, on CPU); int8/fp8 quantise the blocks' weights of a 16/32-bit model
    (compiled engine only, see :mod:`llmenergy.inference.quant`).
    """
    weight = model.tok_embeddings.weight
    if precision is None:
        precision = "bf16" if weight.dtype == torch.bfloat16 else "fp16"
    # the shard count is checked by the hf engine itself; compute capability by the planner
    problem = engine_problem(name, 1, "cpu") or precision_problem(precision, name, "cpu")
    if problem is not None:
        raise UserError(problem)
    want_dtype = PRECISION_DTYPE[precision] if precision in ("fp16", "bf16") else None
    if want_dtype is not None and str(weight.dtype).removeprefix("torch.") not in (want_dtype, "float32"):
        raise UserError(f"engine {name}: precision {precision} needs a {want_dtype} model, not {weight.dtype}")
    from llmenergy.inference import quant

    prepared = quant.model_precision(model)
    if prepared is not None and prepared != precision and prepared in quant.NARROW_BYTES:
        raise UserError(f"engine {name}: the model's weights were quantised to {prepared}, "
                        f"it cannot run {precision}")
    given = {"max_batch_size": (max_batch_size, model.max_batch_size),
             "max_seq_len": (max_seq_len, model.max_seq_len),
             "device": (None if device is None else torch.device(device), weight.device),
             "dtype": (dtype, weight.dtype)}
    for key, (want, have) in given.items():
        if want is not None and want != have and not (key == "device" and _same_device(want, have)):
            raise UserError(f"engine {name}: {key} {want} differs from the model's {have}")
    if name == "reference":
        return ReferenceEngine(model)
    if name == "hf":
        from llmenergy.inference.hf import HFEngine

        return HFEngine(model, cache_dir=cache_dir, compile=compile)
    from llmenergy.inference.compiled import CompiledEngine

    return CompiledEngine(model, cache_dir=cache_dir, compile=compile, precision=precision)


def cell_engine(spec: CellSpec, model: Transformer, *, cache_dir: str | Path | None = None) -> Engine:
    """The engine of a cell: its ``engine`` and ``precision`` axes, from its spec."""
    return make_engine(spec.cell.engine, model, cache_dir=cache_dir, precision=spec.cell.precision)


def _compiled_batches(engine: Engine) -> set[int] | None:
    """The batch sizes ``engine`` compiled for, each a Dynamo cache entry per compiled function:
    none without compile; None when not known (``hf``: transformers decides what it compiles)."""
    if not getattr(engine, "compile", False):
        return set()
    return getattr(engine, "ready_batches", None)


def compiled_entries(engine: Engine) -> int | None:
    """Dynamo cache entries ``engine`` added to each function it compiled (None: not known)."""
    ready = _compiled_batches(engine)
    return None if ready is None else len(ready)


def new_entries(engine: Engine, batch_sizes: set[int]) -> int | None:
    """The entries a cell of these batch sizes adds to ``engine`` (None: not known)."""
    ready = _compiled_batches(engine)
    return None if ready is None else len(batch_sizes - ready) if getattr(engine, "compile", False) else 0


def kept_with(kept: int | None, engine: Engine) -> int | None:
    """The entries kept once ``engine``'s are added to ``kept`` (None: not known)."""
    spent = compiled_entries(engine)
    return None if spent is None or kept is None else kept + spent


def room_for(entries: int | None, more: int) -> bool:
    """Whether ``more`` compiles fit beside ``entries`` kept ones (None: unknown, no) within
    Dynamo's ``recompile_limit`` (8 entries per function), so nothing needs a reset."""
    import torch

    limit = getattr(torch._dynamo.config, "recompile_limit", 8)
    return entries is not None and entries + more <= limit


def forget_compiled() -> None:
    """Drop the compiled code of engines no longer in use (``torch._dynamo.reset``), before a
    job's next engine, when :func:`room_for` says there is no room.  Dynamo keeps
    compiled code per function, not per engine, and compiles one function at most
    ``recompile_limit`` (8) times in a process: without this, the ninth KV-cache shape of a
    packed group failed its compile (``FailOnRecompileLimitHit``, reproduced on CPU).  The
    next engine compiles afresh (Inductor's on-disk cache shortens it), and it decoded ~3.5 %
    slower on an H200 than one built without the reset (docs/measurement.md): hence only
    when needed.  Only with no compiled engine left in use."""
    import torch

    torch._dynamo.reset()


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when 0 is the current one."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        index = torch.cuda.current_device() if a.type == "cuda" else None
        return (a.index if a.index is not None else index) == (b.index if b.index is not None else index)
    return a.index == b.index
