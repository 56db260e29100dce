"""Architectures: the table of named LLaMA sizes, their memory arithmetic, and the
inference engines a cell may use.

Kept free of torch so that config validation and planning (which run every time
Snakemake parses the workflow) stay cheap. Checkpoint folders are inspected in
:mod:`llmenergy.checkpoints`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass

from llmenergy.errors import ConfigError

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

#: the ``precision`` axis (see docs/precision.md): ``fp16``/``bf16`` hold weights and compute
#: in that dtype; ``int8``/``fp8`` (e4m3) are weight-only: the transformer blocks' linear
#: weights are stored narrow with one scale per output channel, activations stay 16-bit.
PRECISIONS: tuple[str, ...] = ("fp16", "bf16", "int8", "fp8")
DEFAULT_PRECISION = "fp16"
#: the activation (and, for fp16/bf16, weight) dtype of each precision on a GPU
PRECISION_DTYPE = {"fp16": "float16", "bf16": "bfloat16", "int8": "float16", "fp8": "float16"}
#: bytes per weight of the transformer blocks' linear layers under each weight-only precision
NARROW_BYTES = {"int8": 1, "fp8": 1}
#: the ``compiled`` engine's environment switches (docs/precision.md): each changes what its
#: cells measure (kernels, attention, prefill), so one that is set is part of their definition
#: (``orchestrate.fingerprint``) and changing it reruns them
ENGINE_SWITCHES: tuple[str, ...] = (
    "LLMENERGY_COMPILE_PREFILL", "LLMENERGY_KEY_BUCKETS", "LLMENERGY_DENSE_GEMV",
    "LLMENERGY_GEMV_TUNE", "LLMENERGY_QUANT_BACKEND", "LLMENERGY_QUANT_AUTOTUNE")


def engine_switches() -> dict[str, str]:
    """The :data:`ENGINE_SWITCHES` set in this process's environment, with their values."""
    return {k: os.environ[k] for k in ENGINE_SWITCHES if k in os.environ}
#: engines that run each precision (``reference`` is the paper's eager fp16 code, ``hf``
#: transformers' generate: both dense only)
PRECISION_ENGINES = {"fp16": ("reference", "compiled", "hf"), "bf16": ("reference", "compiled", "hf"),
                     "int8": ("compiled",), "fp8": ("compiled",)}
#: the engines that give per-position logits, so a bf16 cell can compare its logits with
#: fp16's (``inference.fidelity``); a bf16 job of one of them loads the weights twice (fp16
#: for the references, freed, then bf16), and the planner's load estimate counts both
LOGIT_ENGINES: tuple[str, ...] = ("reference", "compiled")
#: the lowest CUDA compute capability of each precision (fp8 e4m3 conversions: Ada/Hopper)
MIN_COMPUTE_CAPABILITY = {"bf16": 8.0, "fp8": 8.9}
#: compute capabilities of GPU names a ``gpus.<type>`` key may carry (matched case-insensitively
#: as a word of the name: ``H100``, ``h100-sxm``, ``a100_80g``); ``gpus.<type>.compute_capability``
#: overrides it
KNOWN_COMPUTE_CAPABILITY = {"v100": 7.0, "t4": 7.5, "a100": 8.0, "a30": 8.0, "a10": 8.6,
                            "a40": 8.6, "l4": 8.9, "l40": 8.9, "l40s": 8.9, "h100": 9.0,
                            "h200": 9.0, "gh200": 9.0, "h800": 9.0, "b200": 10.0, "gb200": 10.0}


#: vocabulary size of the project's own tokenizer (see :mod:`llmenergy.inference.tokenizer`)
TINY_VOCAB_SIZE = 1536


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1's ``rope_scaling`` of type ``llama3``: rotary frequencies whose wavelength
    exceeds ``original_max_seq_len / low_freq_factor`` are divided by ``factor``, those
    shorter than ``original_max_seq_len / high_freq_factor`` kept, and those between
    blended smoothly (Meta's ``apply_scaling``; HF's ``rope_type: llama3``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def scale(self, inv_freq: list[float]) -> list[float]:
        """The scaled inverse frequencies (radians per position), as Meta computes them."""
        low_wavelen = self.original_max_seq_len / self.low_freq_factor
        high_wavelen = self.original_max_seq_len / self.high_freq_factor
        out = []
        for freq in inv_freq:
            wavelen = 2 * math.pi / freq
            if wavelen < high_wavelen:
                out.append(freq)
            elif wavelen > low_wavelen:
                out.append(freq / self.factor)
            else:
                smooth = ((self.original_max_seq_len / wavelen - self.low_freq_factor)
                          / (self.high_freq_factor - self.low_freq_factor))
                out.append((1 - smooth) * freq / self.factor + smooth * freq)
        return out


#: the defaults of Llama-3.1 and later 8B/70B (Meta's ``use_scaled_rope: true``)
LLAMA3_ROPE_SCALING = RopeScaling()


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of a LLaMA-shaped model (Meta's ``params.json`` fields)."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # explicit override (HF ``intermediate_size``)
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Feed-forward width, computed the way Meta's reference does (2/3 of 4*dim, rounded up)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def replace(self, **changes: object) -> ModelArgs:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


_LLAMA2 = {"vocab_size": 32000, "norm_eps": 1e-5, "max_seq_len": 4096}
_LLAMA3 = {"vocab_size": 128256, "norm_eps": 1e-5, "max_seq_len": 8192, "n_kv_heads": 8,
           "rope_theta": 500000.0, "ffn_dim_multiplier": 1.3}
_LLAMA31 = {**_LLAMA3, "max_seq_len": 131072, "rope_scaling": LLAMA3_ROPE_SCALING}
#: tiny models with the structure of each family (GQA, rope_theta, rope_scaling), for
#: demos and tests on CPU; the vocabulary is that of the project's own tokenizer.
_TINY = {"dim": 128, "n_layers": 2, "n_heads": 8, "vocab_size": TINY_VOCAB_SIZE,
         "multiple_of": 32, "norm_eps": 1e-5}

SIZES: dict[str, ModelArgs] = {
    # Small enough to run a whole demo cell on two CPU cores in seconds.
    "llama-tiny": ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=TINY_VOCAB_SIZE,
                            multiple_of=32, norm_eps=1e-5, max_seq_len=512),
    # LLaMA-1 (2023, the paper's models)
    "llama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "llama-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
    "llama-30b": ModelArgs(dim=6656, n_layers=60, n_heads=52, vocab_size=32000),
    "llama-65b": ModelArgs(dim=8192, n_layers=80, n_heads=64, vocab_size=32000),
    # Llama-2: 4096 context; 70B uses GQA (8 key/value heads)
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, **_LLAMA2),  # type: ignore[arg-type]
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, **_LLAMA2),  # type: ignore[arg-type]
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                            ffn_dim_multiplier=1.3, **_LLAMA2),  # type: ignore[arg-type]
    # Llama-3 / 3.1: GQA (8 key/value heads), rope_theta 500000, 128,256-entry vocabulary;
    # 3.1 adds llama3 rope scaling (and a 128K context)
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, multiple_of=1024,
                           **_LLAMA3),  # type: ignore[arg-type]
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, multiple_of=4096,
                            **_LLAMA3),  # type: ignore[arg-type]
    "llama3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, multiple_of=1024,
                             **_LLAMA31),  # type: ignore[arg-type]
    "llama3.1-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, multiple_of=4096,
                              **_LLAMA31),  # type: ignore[arg-type]
    "llama2-tiny": ModelArgs(n_kv_heads=4, max_seq_len=4096, **_TINY),  # type: ignore[arg-type]
    "llama3-tiny": ModelArgs(n_kv_heads=4, max_seq_len=8192, rope_theta=500000.0,
                             **_TINY),  # type: ignore[arg-type]
    "llama3.1-tiny": ModelArgs(n_kv_heads=4, max_seq_len=131072, rope_theta=500000.0,
                               rope_scaling=LLAMA3_ROPE_SCALING, **_TINY),  # type: ignore[arg-type]
}


def get_arch(name: str, *, key: str = "model") -> ModelArgs:
    try:
        return SIZES[name]
    except KeyError:
        raise ConfigError(f"{key}: unknown model architecture {name!r} (known: {', '.join(SIZES)})") from None


def n_params(args: ModelArgs) -> int:
    """Parameter count of the LLaMA transformer."""
    head = args.head_dim
    attn = args.dim * args.n_heads * head * 2 + args.dim * args.kv_heads * head * 2
    ffn = 3 * args.dim * args.hidden_dim
    per_layer = attn + ffn + 2 * args.dim
    return args.n_layers * per_layer + 2 * args.vocab_size * args.dim + args.dim


def linear_params(args: ModelArgs) -> int:
    """Parameters of the transformer blocks' linear layers (what int8/fp8 store narrow)."""
    head = args.head_dim
    attn = args.dim * args.n_heads * head * 2 + args.dim * args.kv_heads * head * 2
    return args.n_layers * (attn + 3 * args.dim * args.hidden_dim)


def weight_bytes(args: ModelArgs, dtype: str = "float16", precision: str = DEFAULT_PRECISION) -> int:
    """Bytes of all weights in ``dtype``; with ``int8``/``fp8`` the blocks' linear weights take
    one byte each plus a ``dtype`` scale per output channel (embeddings, norms and the output
    head stay in ``dtype``)."""
    size = DTYPE_BYTES[_dtype_name(dtype)]
    if precision not in NARROW_BYTES:
        return n_params(args) * size
    lin = linear_params(args)
    q, kv = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    # output channels of wq, wk, wv, wo, w1, w3, w2
    channels = args.n_layers * (q + 2 * kv + args.dim + 2 * args.hidden_dim + args.dim)
    return (n_params(args) - lin) * size + lin * NARROW_BYTES[precision] + channels * size


def weight_loads(precision: str, engine: str) -> int:
    """How many times a job loads its weights: twice for bf16 on a :data:`LOGIT_ENGINES` engine
    (an fp16 load for the fidelity references, freed before the bf16 one), else once."""
    return 2 if precision == "bf16" and engine in LOGIT_ENGINES else 1


def compute_capability(name: str, given: float | None = None) -> float | None:
    """The CUDA compute capability of GPU type ``name``: ``given`` when set, else from
    :data:`KNOWN_COMPUTE_CAPABILITY` by a word of the name, else None (unknown)."""
    if given is not None:
        return given
    words = re.split(r"[^a-z0-9]+", name.lower())
    for word in words:
        if word in KNOWN_COMPUTE_CAPABILITY:
            return KNOWN_COMPUTE_CAPABILITY[word]
    return None


def precision_problem(precision: str, engine: str, device: str = "cuda", gpu: str = "",
                      capability: float | None = None) -> str | None:
    """Why a cell of ``precision`` on ``engine`` and GPU type ``gpu`` cannot run, or None.

    ``capability``: the GPU's compute capability (:func:`compute_capability`); None when
    unknown, which rules out fp8 (a GPU before Ada/Hopper cannot convert to e4m3) but not
    bf16.  On a CPU device every precision runs (int8/fp8 through the pure-PyTorch path).
    """
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})"
    if engine not in PRECISION_ENGINES[precision]:
        return (f"engine {engine}: runs {', '.join(p for p, e in PRECISION_ENGINES.items() if engine in e)} "
                f"only, not {precision} (weight-only {precision} needs the compiled engine)")
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    if device == "cpu" or need is None:
        return None
    if capability is None:
        if precision == "fp8":
            return (f"{gpu} × fp8: compute capability unknown; set gpus.{gpu}.compute_capability "
                    f"(fp8 needs ≥ {need:g}: L4, L40, H100, H200 ...)")
        return None
    if capability < need:
        return f"{gpu} × {precision}: needs compute capability ≥ {need:g}, {gpu} has {capability:g}"
    return None


def _dtype_name(dtype: object) -> str:
    """'float16' for "float16" or torch.float16 (no torch import here)."""
    return str(dtype).removeprefix("torch.")


def kv_cache_bytes(args: ModelArgs, batch: int, seq_len: int, dtype: str = "float16") -> int:
    return 2 * args.n_layers * batch * seq_len * args.kv_heads * args.head_dim * DTYPE_BYTES[_dtype_name(dtype)]


def shard_problem(name: str, args: ModelArgs, shards: int) -> str | None:
    """Why ``shards`` ranks cannot hold model ``name``, or None when they can.

    Example: ``llama-13b × 16 shards: 16 does not divide 40 attention heads``.
    """
    if shards < 1:
        return f"{name} × {shards} shards: the shard count must be positive"
    checks = [
        (args.n_heads, "attention heads"),
        (args.kv_heads, "key/value heads"),
        (args.hidden_dim, "feed-forward units"),
        (args.dim, "model dimensions"),
        (args.vocab_size, "vocabulary entries"),
    ]
    if args.n_kv_heads is None:
        checks.pop(1)
    for count, what in checks:
        if count % shards:
            return f"{name} × {shards} shards: {shards} does not divide {count} {what}"
    return None


# ----------------------------------------------------------------- checkpoints

#: inference engines a cell can use (see :mod:`llmenergy.inference.engines`)
ENGINES: tuple[str, ...] = ("reference", "compiled", "hf")


def engine_problem(engine: str, shards: int, device: str = "cuda") -> str | None:
    """Why ``engine`` cannot run a cell of ``shards`` ranks on ``device``, or None when it can.

    Torch-free, for config validation and planning.  ``reference`` and
    ``compiled`` run any shard count that :func:`shard_problem` accepts, ``hf``
    one rank only; all on CUDA and (for tests) on CPU.
    """
    if engine not in ENGINES:
        return f"unknown engine {engine!r} (known: {', '.join(ENGINES)})"
    if shards < 1:
        return f"engine {engine}: the shard count must be positive, got {shards}"
    if device not in ("cuda", "cpu"):
        return f"engine {engine}: unknown device {device!r} (cuda or cpu)"
    if engine == "hf" and shards > 1:
        return f"engine hf: runs one rank only (transformers' generate on the full weights), not {shards} shards"
    return None
