"""The linear layers of the ``compiled`` engine: fused per shard, dense or weight-only narrow.

:func:`prepare` turns each transformer block's seven projections into four linear
modules, once per model (later engines on the same model reuse them):

- ``qkv``: ``wq``, ``wk`` and ``wv`` of this rank's shard concatenated along the
  output channels; ``gate_up``: ``w1`` and ``w3`` likewise; ``wo`` and ``w2``
  (row-parallel) as they are.  One matrix read per fused projection instead of
  three or two launches.
- ``fp16``/``bf16`` (dense): the fused weight is one new tensor and the model's
  ``wq``/``wk``/``wv``/``w1``/``w3`` parameters become views of it, so the weights
  are not held twice and the other engines still read the same values.
- ``int8``/``fp8`` (weight-only, e4m3): each local weight is quantised with one
  scale per local output channel (symmetric, ``scale = max|w| / 127`` or ``/ 448``);
  the model's 16-bit block weights are then released (the model can only be run by
  this engine afterwards: :func:`model_precision` says so).  Embeddings, norms and the
  output head stay in the model's dtype.

Kernels (:func:`backend`), on CUDA the first that imports and passes a smoke check:

- ``triton``: :class:`KernelNarrowLinear`, our Triton kernel
  (:mod:`llmenergy.inference.narrow_mm`) that reads the int8/e4m3 weight and converts
  it in registers, for the decode step's few rows; the step compiles as fp16's does.
- ``torchao``: torchao's ``Int8WeightOnlyConfig`` / ``Float8WeightOnlyConfig``, with
  Inductor options of their own (:func:`compile_options`).
- ``torch`` (always on CPU): :class:`NarrowLinear`, pure PyTorch
  ``F.linear(x, q.to(dtype)) * scale``: correct, but on a GPU Inductor materialises
  the dequantised weight every step above batch 1 (issue 24).

``LLMENERGY_QUANT_BACKEND=triton|torchao|torch`` forces one.  See docs/precision.md.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmenergy.arch import NARROW_BYTES, PRECISIONS
from llmenergy.errors import UserError
from llmenergy.inference import narrow_mm

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
#: the weight dtype of each narrow precision
NARROW_DTYPES = {"int8": torch.int8, "fp8": FP8_DTYPE}
#: the largest finite e4m3 value and int8's symmetric range
FP8_MAX = 448.0
INT8_MAX = 127
#: attribute of a model whose linears were prepared: (precision, backend, list[Linears])
_ATTR = "_llmenergy_linears"
_ENV = "LLMENERGY_QUANT_BACKEND"


# ----------------------------------------------------------------- quantisation

def _scale(w: torch.Tensor, top: float) -> torch.Tensor:
    amax = w.abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / top, torch.ones_like(amax))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output channel) with ``w ≈ q * scale[:, None]``;
    each element is off by at most ``scale / 2`` (round to nearest, no clipping)."""
    scale = _scale(w, INT8_MAX)
    q = torch.round(w.float() / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale per output channel): the row maximum maps to 448."""
    scale = _scale(w, FP8_MAX)
    q = (w.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize(w: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    if precision == "int8":
        return quantize_int8(w)
    if precision == "fp8":
        return quantize_fp8(w)
    raise UserError(f"precision {precision!r} is not weight-only (int8, fp8)")


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


# ----------------------------------------------------------------- linear modules

class DenseLinear(nn.Module):
    """``F.linear(x, weight)`` on a weight it does not copy.

    With :attr:`gemv` on (:func:`use_gemv`: CUDA, Triton, opt-in), a compiled graph whose input
    has one row (the decode step at batch 1) calls our one-row kernel through the op
    ``llmenergy::narrow_mm`` on the 16-bit weight, scale 1 (fp32 accumulation, like
    cuBLAS's); any other row count, and every eager call, is ``F.linear``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.gemv = False  # with it, a buffer ``ones`` (the kernel's scale): :func:`use_gemv`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv and torch.compiler.is_compiling():
            # the rows are static in the decode step, symbolic (not an int) in the compiled prefill
            rows = math.prod(x.shape[:-1])
            if type(rows) is int and rows == 1:
                return narrow_mm.narrow_mm(x, self.weight, self.ones)
        return F.linear(x, self.weight)


class NarrowLinear(nn.Module):
    """Weight-only int8/fp8 in pure PyTorch: ``F.linear(x, q.to(x.dtype)) * scale``, in
    float16 ``F.linear(x, q.to(x.dtype) * scale)`` (:func:`llmenergy.inference.narrow_mm.reference`)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scale", scale.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return narrow_mm.reference(x, self.qweight, self.scale)


class KernelNarrowLinear(NarrowLinear):
    """Weight-only int8/fp8 through our kernel, which reads the narrow weight where the rows
    are few (decode); the PyTorch expression runs elsewhere.  Under ``torch.compile`` (the
    decode step, the prefill's block) through the opaque op ``llmenergy::narrow_mm``, eagerly
    without its dispatch (:func:`narrow_mm.eager`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return narrow_mm.narrow_mm(x, self.qweight, self.scale)
        return narrow_mm.eager(x, self.qweight, self.scale)


def _torchao_linear(weight: torch.Tensor, precision: str) -> nn.Module:
    """An ``nn.Linear`` holding ``weight`` quantised by torchao (raises when it cannot)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    # set_inductor_config=False: torchao would otherwise turn on coordinate-descent tuning
    # for the whole process (minutes more compile); the engine sets its own options
    config = (Int8WeightOnlyConfig(set_inductor_config=False) if precision == "int8"
              else Float8WeightOnlyConfig(set_inductor_config=False))
    quantize_(lin, config)
    return lin


def _check(lin: nn.Module, weight: torch.Tensor, precision: str) -> None:
    """Raise when ``lin`` differs from the dense layer by more than its precision allows."""
    x = torch.randn(2, weight.shape[1], device=weight.device, dtype=weight.dtype,
                    generator=torch.Generator(weight.device).manual_seed(0))
    with torch.no_grad():
        got, want = lin(x).float(), F.linear(x, weight).float()
    rel = float((got - want).norm() / want.norm().clamp_min(1e-12))
    if not rel < (0.02 if precision == "int8" else 0.1):
        raise RuntimeError(f"relative error {rel:.3g} against the dense layer")


#: the kernels of int8/fp8 weights, in the order tried on CUDA (the last one always works)
BACKENDS = ("triton", "torchao", "torch")


def backend(precision: str, device: torch.device) -> str:
    """``dense`` (fp16/bf16), else on CUDA ``triton`` (Triton importable), ``torchao``
    (torchao importable) or ``torch`` (the fallback; always on CPU)."""
    if precision not in NARROW_BYTES:
        return "dense"
    forced = os.environ.get(_ENV)
    if forced in BACKENDS:
        return forced
    if forced:
        raise UserError(f"{_ENV}={forced!r}: must be one of {', '.join(BACKENDS)}")
    if device.type != "cuda":
        return "torch"
    if narrow_mm.triton is not None:
        return "triton"
    try:
        import torchao.quantization  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no torchao here
        log.warning("torchao unavailable (%s): %s weights run through the pure-PyTorch path, "
                    "which dequantises every step (slower than fp16 on a GPU)", exc, precision)
        return "torch"
    return "torchao"


def narrow_linear(weight: torch.Tensor, precision: str, kind: str) -> tuple[nn.Module, str]:
    """(module, backend actually used) for a local ``weight`` under ``precision``."""
    if kind == "triton":
        q, scale = quantize(weight, precision)
        lin = KernelNarrowLinear(q, scale, weight.dtype)
        try:
            _check(lin, weight, precision)
            return lin, "triton"
        except Exception as exc:  # noqa: BLE001 - fall back, loudly, on anything the kernel raises
            log.warning("the Triton %s kernel failed (%s: %s); using the pure-PyTorch path",
                        precision, type(exc).__name__, exc)
            return NarrowLinear(q, scale, weight.dtype), "torch"
    if kind == "torchao":
        try:
            lin = _torchao_linear(weight, precision)
            _check(lin, weight, precision)
            return lin, "torchao"
        except Exception as exc:  # noqa: BLE001 - fall back, loudly, on anything torchao raises
            log.warning("torchao %s failed (%s: %s); using the pure-PyTorch path",
                        precision, type(exc).__name__, exc)
    q, scale = quantize(weight, precision)
    return NarrowLinear(q, scale, weight.dtype), "torch"


#: Inductor options of a compiled step with int8/fp8 weights on CUDA, for batch 1:
#: with ``coordinate_descent_tuning`` Inductor decomposes a matmul with one row into a
#: multiply and a sum (``torch/_inductor/decomposition.py``, ``mm``: "Our matrix vector
#: multiplies only achieve peak bandwidth with coordinate descent tuning"), and the
#: narrow → 16-bit conversion and the scale fuse into that reduction, which then reads
#: the int8/e4m3 weight itself.  gpt-fast sets it for its int8 weight-only layers, and so
#: does torchao's ``set_inductor_config`` (process-wide; here it is this compile's option
#: only).  Without it (the H200, torch 2.11, torchao 0.18) int8 and fp8 ran at 0.40x fp16.
NARROW_GEMV_OPTIONS: dict[str, Any] = {"coordinate_descent_tuning": True}
#: ... and for batches > 1 (a matmul Inductor does not decompose): GEMMs as Triton
#: templates, so that the conversion can be fused into the template's loads of the weight
#: (prologue fusion) instead of written out as a dequantised copy first (what cuBLAS
#: needs: issue 24's 2x slowdown).  Not yet measured on a GPU; ``LLMENERGY_QUANT_AUTOTUNE=0``
#: turns these off (the batch-1 option stays).
NARROW_GEMM_OPTIONS: dict[str, Any] = {
    "max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON", "prologue_fusion": True}


def compile_options(kind: str, device: torch.device) -> dict[str, Any]:
    """Extra torch.compile options for linears of backend ``kind`` on ``device`` (empty:
    none; ``dense`` and ``triton`` compile as fp16 does)."""
    if kind not in ("torch", "torchao") or device.type != "cuda":
        return {}
    import torch._inductor.config as inductor

    wanted = dict(NARROW_GEMV_OPTIONS)
    if os.environ.get("LLMENERGY_QUANT_AUTOTUNE") != "0":
        wanted.update(NARROW_GEMM_OPTIONS)
    return {k: v for k, v in wanted.items() if hasattr(inductor, k)}


# ----------------------------------------------------------------- per model

@dataclasses.dataclass
class Linears:
    """The four projections of one block (this rank's shard)."""

    qkv: nn.Module
    qkv_sizes: tuple[int, int, int]
    wo: nn.Module
    gate_up: nn.Module
    hidden: int  # local feed-forward width: gate_up's output is [gate | up]
    w2: nn.Module

    def modules(self) -> tuple[nn.Module, ...]:
        return self.qkv, self.wo, self.gate_up, self.w2


def _fuse(modules: list[Any]) -> torch.Tensor:
    """The weights of ``modules`` concatenated along output channels; their parameters
    become views of the result (no second copy)."""
    fused = torch.cat([m.weight.data for m in modules], dim=0)
    row = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[row:row + n], requires_grad=False)
        row += n
    return fused


def _release(modules: list[Any]) -> None:
    for m in modules:
        m.weight = nn.Parameter(torch.empty(0, device=m.weight.device, dtype=m.weight.dtype),
                                requires_grad=False)


def prepare(model: nn.Module, precision: str) -> tuple[list[Linears], str]:
    """The fused (and for int8/fp8 quantised) projections of every block, and the backend.

    Done once per model; asking again for another precision is an error when either is
    int8/fp8 (they release the 16-bit weights); fp16 and bf16 share the fused weights.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    done = getattr(model, _ATTR, None)
    if done is not None:
        if done[0] != precision and (done[1] != "dense" or precision in NARROW_BYTES):
            raise UserError(f"the model's linears were prepared for {done[0]}, not {precision}")
        return done[2], done[1]
    device = model.tok_embeddings.weight.device
    kind = backend(precision, device)
    used: set[str] = set()
    layers: list[Linears] = []
    for layer in model.layers:
        a, ff = layer.attention, layer.feed_forward
        sizes = (a.wq.weight.shape[0], a.wk.weight.shape[0], a.wv.weight.shape[0])
        hidden = ff.w1.weight.shape[0]
        weights = {"qkv": _fuse([a.wq, a.wk, a.wv]), "wo": a.wo.weight.data,
                   "gate_up": _fuse([ff.w1, ff.w3]), "w2": ff.w2.weight.data}
        mods: dict[str, nn.Module] = {}
        for key, w in weights.items():
            if kind == "dense":
                mods[key] = DenseLinear(w)
            else:
                mods[key], how = narrow_linear(w, precision, kind)
                used.add(how)
        if kind != "dense":
            del weights
            _release([a.wq, a.wk, a.wv, a.wo, ff.w1, ff.w3, ff.w2])
        layers.append(Linears(mods["qkv"], sizes, mods["wo"], mods["gate_up"], hidden, mods["w2"]))
    how = "dense" if kind == "dense" else ("torch" if "torch" in used else kind)
    if kind != "dense" and device.type == "cuda":
        torch.cuda.empty_cache()
    log.info("prepared %d blocks' linears: %s, backend %s", len(layers), precision, how)
    setattr(model, _ATTR, (precision, how, layers))
    return layers, how


#: ``LLMENERGY_DENSE_GEMV=1``: fp16/bf16 decode at batch 1 through our GEMV, not cuBLAS (off
#: by default: on two H200s it ran 3.5-5.7 % faster at 15-20 % more J/token, docs/precision.md)
DENSE_GEMV_ENV = "LLMENERGY_DENSE_GEMV"


def use_gemv(layers: list[Linears], device: torch.device) -> bool:
    """Turn on the one-row kernel of the dense linears (:class:`DenseLinear`) where it
    applies (CUDA, Triton) and is asked for (``LLMENERGY_DENSE_GEMV=1``); whether it is on."""
    dense = [m for lin in layers for m in lin.modules() if isinstance(m, DenseLinear)]
    on = (bool(dense) and device.type == "cuda" and narrow_mm.triton is not None
          and os.environ.get(DENSE_GEMV_ENV, "0") == "1")
    for m in dense:
        m.gemv = on
        if on and not hasattr(m, "ones"):
            m.register_buffer("ones", torch.ones(m.weight.shape[0], device=device,
                                                 dtype=m.weight.dtype), persistent=False)
    return on


def warm_kernels(layers: list[Linears], dtype: torch.dtype, agree: narrow_mm.Agree | None = None) -> int:
    """Have Triton compile our kernel's variants for every projection shape now (CUDA,
    backend ``triton``, and dense linears with :attr:`DenseLinear.gemv`;
    :func:`llmenergy.inference.narrow_mm.warm`, ``agree`` the ranks' agreement on its
    tuning); the launches run."""
    pairs = [(m.qweight, m.scale) if isinstance(m, KernelNarrowLinear) else (m.weight, m.ones)
             for lin in layers for m in lin.modules()
             if isinstance(m, KernelNarrowLinear) or (isinstance(m, DenseLinear) and m.gemv)]
    return narrow_mm.warm(pairs, dtype, agree) if pairs else 0


def model_precision(model: nn.Module) -> str | None:
    """The precision the model's linears were prepared for, or None."""
    done = getattr(model, _ATTR, None)
    return None if done is None else done[0]


def linear_bytes(layers: list[Linears]) -> int:
    """Bytes the blocks' projections hold (what a decode step reads of them)."""
    total = 0
    for lin in layers:
        for mod in lin.modules():
            for t in list(mod.parameters()) + list(mod.buffers()):
                total += _tensor_bytes(t)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``, including the inner tensors of a torchao subclass."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
