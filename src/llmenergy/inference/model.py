"""LLaMA-shaped transformer on fairscale model-parallel layers.

The module layout and parameter names follow Meta's reference implementation
(``tok_embeddings``, ``layers.N.attention.wq`` ..., ``output``) so that Meta
checkpoints load by name.  Tensor-parallel sharding follows fairscale:
column-parallel weights are split along dim 0, row-parallel ones along dim 1,
and ``ParallelEmbedding`` splits the embedding dimension (dim 1).

Construction never touches real memory: :func:`build_on_meta` builds every
parameter and buffer on the ``meta`` device, and :func:`materialize` allocates
them directly on the target device and dtype.  Filling in values is the job of
:mod:`llmenergy.inference.weights`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN attention is left out: it plans anew for every key length, which costs
# ~1.6 ms of CPU per layer and decode step (measured on H100, torch 2.11).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

from llmenergy.arch import (  # noqa: E402 - the torch-free table of sizes lives in arch
    SIZES,
    TINY_VOCAB_SIZE,
    ModelArgs,
    RopeScaling,
    get_arch,
    kv_cache_bytes,
    n_params,
    weight_bytes,
)

__all__ = ["SIZES", "TINY_VOCAB_SIZE", "ModelArgs", "Transformer", "get_arch", "kv_cache_bytes", "n_params",
           "weight_bytes"]


def shard_dim(param_name: str) -> int | None:
    """Dimension along which ``param_name`` is split across model-parallel ranks.

    ``None`` for replicated tensors (norm weights).
    """
    leaf = param_name.rsplit(".", 2)[-2] if param_name.endswith(".weight") else param_name
    if leaf in ("wq", "wk", "wv", "w1", "w3", "output"):
        return 0
    if leaf in ("wo", "w2", "tok_embeddings"):
        return 1
    return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(head_dim: int, max_seq_len: int, theta: float,
                     device: torch.device | str | None = None,
                     scaling: RopeScaling | None = None) -> torch.Tensor:
    """Complex rotations ``[max_seq_len, head_dim // 2]`` (Meta's ``freqs_cis``), with
    Llama-3.1's ``llama3`` frequency scaling when ``scaling`` is given."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float()
                           / head_dim))
    if scaling is not None:  # computed on the CPU: under build_on_meta, ``inv`` has no values
        cpu = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float()
                               / head_dim))
        inv = torch.tensor(scaling.scale(cpu.tolist()), dtype=torch.float32, device=device)
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, S, H, D] by ``freqs`` [S, D/2] (interleaved pairs, as Meta)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, max_batch_size: int, max_seq_len: int) -> None:
        super().__init__()
        ws = get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // ws
        self.n_local_kv_heads = args.kv_heads // ws
        self.head_dim = args.head_dim
        self.wq = fs_layers.ColumnParallelLinear(args.dim, args.n_heads * self.head_dim,
                                                 bias=False, gather_output=False)
        self.wk = fs_layers.ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim,
                                                 bias=False, gather_output=False)
        self.wv = fs_layers.ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim,
                                                 bias=False, gather_output=False)
        self.wo = fs_layers.RowParallelLinear(args.n_heads * self.head_dim, args.dim,
                                              bias=False, input_is_parallel=True)
        shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int, freqs: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rope(xq, freqs), apply_rope(xk, freqs)
        end = start_pos + seqlen
        self.cache_k[:bsz, :, start_pos:end] = xk.transpose(1, 2)
        self.cache_v[:bsz, :, start_pos:end] = xv.transpose(1, 2)
        keys = self.cache_k[:bsz, :, :end]
        values = self.cache_v[:bsz, :, :end]
        rep = self.n_local_heads // self.n_local_kv_heads
        if rep > 1:
            keys = keys.repeat_interleave(rep, dim=1)
            values = values.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), keys, values, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = fs_layers.ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False)
        self.w2 = fs_layers.RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True)
        self.w3 = fs_layers.ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, max_batch_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.attention = Attention(args, max_batch_size, max_seq_len)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, freqs: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """LLaMA decoder with a per-layer KV cache of ``(max_batch_size, max_seq_len)``."""

    def __init__(self, args: ModelArgs, max_batch_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.args = args
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.tok_embeddings = fs_layers.ParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args, max_batch_size, max_seq_len) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = fs_layers.ColumnParallelLinear(args.dim, args.vocab_size, bias=False)
        # RoPE rotations: a placeholder of their shape (the model is built on ``meta``, where
        # arithmetic would only import torch's decompositions, ~2 s); materialize() computes them
        self.register_buffer(
            "freqs_cis", torch.empty(max_seq_len, args.head_dim // 2, dtype=torch.complex64),
            persistent=False)

    def forward(self, tokens: torch.Tensor, start_pos: int, *,
                n_pad: torch.Tensor | None = None, last_only: bool = False,
                tail: int | None = None) -> torch.Tensor:
        """Logits (float32) for ``tokens`` [B, S] placed at positions ``start_pos``...

        ``n_pad`` [B] gives the number of left-padding positions of each sequence;
        keys at those positions are masked out.  With ``last_only`` only the last
        position's logits are computed ([B, 1, V]); with ``tail`` the last ``tail``'s.
        """
        bsz, seqlen = tokens.shape
        end = start_pos + seqlen
        if bsz > self.max_batch_size or end > self.max_seq_len:
            raise ValueError(f"batch {bsz} × positions {end} exceed the cache "
                             f"({self.max_batch_size} × {self.max_seq_len})")
        h = self.tok_embeddings(tokens)
        freqs = self.freqs_cis[start_pos:end]
        mask = attention_mask(start_pos, seqlen, n_pad, tokens.device)
        with sdpa_kernel(SDPA_BACKENDS):
            for layer in self.layers:
                h = layer(h, start_pos, freqs, mask)
        if last_only or tail:
            h = h[:, -(1 if last_only else tail):]
        return self.output(self.norm(h)).float()


def attention_mask(start_pos: int, seqlen: int, n_pad: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, S, start_pos+S] (True = attend), or None when not needed.

    Causal within the new positions; keys in a sequence's left padding are hidden,
    except that a padding query sees itself so that no row is empty (no NaN).
    """
    if n_pad is None and seqlen == 1:
        return None
    end = start_pos + seqlen
    q = torch.arange(start_pos, end, device=device)[:, None]
    k = torch.arange(end, device=device)[None, :]
    mask = (k <= q)[None, None]
    if n_pad is not None:
        real = k[None] >= n_pad.to(device)[:, None, None]
        mask = mask & (real | (k == q)[None])[:, None]
    return mask


@contextlib.contextmanager
def _fairscale_on_meta() -> Iterator[None]:
    """Make fairscale layers allocate on ``meta`` and skip their master-weight init.

    fairscale builds weights with ``torch.Tensor(...)`` (which ignores the default
    device) and, with more than one rank, initialises a full CPU master weight —
    223 s for 7B.  Both are bypassed here; values are filled in later.
    """
    saved_init, saved_param = fs_layers._initialize_affine_weight, fs_layers.Parameter

    def meta_param(t: torch.Tensor, requires_grad: bool = True) -> nn.Parameter:
        return nn.Parameter(torch.empty(t.shape, device="meta"), requires_grad=False)

    fs_layers._initialize_affine_weight = lambda *a, **k: None
    fs_layers.Parameter = meta_param
    try:
        with torch.device("meta"):
            yield
    finally:
        fs_layers._initialize_affine_weight = saved_init
        fs_layers.Parameter = saved_param


def build_on_meta(args: ModelArgs, max_batch_size: int, max_seq_len: int) -> Transformer:
    """The model with every tensor on the ``meta`` device (needs model parallel set up)."""
    with _fairscale_on_meta():
        return Transformer(args, max_batch_size, max_seq_len)


def materialize(model: Transformer, device: torch.device | str, dtype: torch.dtype) -> None:
    """Allocate all tensors on ``device``: weights uninitialised in ``dtype``,
    norms set to one, KV caches zeroed, RoPE frequencies computed."""
    device = torch.device(device)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            data = torch.empty(p.shape, device=device, dtype=dtype)
            if isinstance(module, RMSNorm):
                data.fill_(1.0)
            module._parameters[name] = nn.Parameter(data, requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is None:
                continue
            if name == "freqs_cis":
                a = model.args
                module._buffers[name] = rope_frequencies(a.head_dim, model.max_seq_len,
                                                         a.rope_theta, device, a.rope_scaling)
            else:
                module._buffers[name] = torch.zeros(b.shape, device=device, dtype=dtype)
    model.eval()


def full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of the full (unsharded) model, by Meta name."""
    d, hd, hid = args.dim, args.head_dim, args.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (args.n_heads * hd, d)
        shapes[p + "attention.wk.weight"] = (args.kv_heads * hd, d)
        shapes[p + "attention.wv.weight"] = (args.kv_heads * hd, d)
        shapes[p + "attention.wo.weight"] = (d, args.n_heads * hd)
        shapes[p + "feed_forward.w1.weight"] = (hid, d)
        shapes[p + "feed_forward.w2.weight"] = (d, hid)
        shapes[p + "feed_forward.w3.weight"] = (hid, d)
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (args.vocab_size, d)
    return shapes


def num_bytes(model: nn.Module) -> int:
    """Bytes held by this rank's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())



def resize_cache(model: Transformer, max_batch_size: int, max_seq_len: int) -> None:
    """Give ``model`` a KV cache of ``(max_batch_size, max_seq_len)``, keeping its weights.

    What a packed group does between cells: each cell gets the cache it would have had
    alone. The old caches are released before the new ones are allocated, so the peak
    is never two caches. Same size: nothing changes (a cache is written before it is read).
    """
    if (max_batch_size, max_seq_len) == (model.max_batch_size, model.max_seq_len):
        return
    weight = model.tok_embeddings.weight
    device, dtype = weight.device, weight.dtype
    attentions = [layer.attention for layer in model.layers]
    for attn in attentions:
        attn.cache_k = attn.cache_v = torch.empty(0, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for attn in attentions:
        shape = (max_batch_size, attn.n_local_kv_heads, max_seq_len, attn.head_dim)
        attn.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        attn.cache_v = torch.zeros(shape, device=device, dtype=dtype)
    model.max_batch_size, model.max_seq_len = max_batch_size, max_seq_len
    a = model.args
    model.freqs_cis = rope_frequencies(a.head_dim, max_seq_len, a.rope_theta, device)
