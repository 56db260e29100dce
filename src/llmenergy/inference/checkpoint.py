"""Meta (``consolidated.NN.pth`` + ``params.json``) and HF (``config.json`` +
``*.safetensors``) checkpoints: detection, resharding load, and writers.

Loading reshards on the fly: a Meta checkpoint saved with MP degree ``S``
(= number of files) loads on any ``N`` ranks whose slices line up.  Each rank
memory-maps the files (``torch.load(..., mmap=True, weights_only=True)``) and
copies only the rows/columns of its own shard.  Split dimensions follow
fairscale (see :func:`llmenergy.inference.model.shard_dim`); norms are replicated and
read from file 0.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import get_model_parallel_group

from llmenergy.atomic import atomic_path, write_json
from llmenergy.checkpoints import (
    HF_INDEX,
    META_SHARD_RE,
    args_from_hf_config,
    args_from_params,
)
from llmenergy.checkpoints import read_json as _read_json
from llmenergy.errors import CheckpointError
from llmenergy.inference.model import ModelArgs, Transformer, full_shapes, shard_dim

log = logging.getLogger(__name__)

_META_FILE = META_SHARD_RE


class Checkpoint(Protocol):
    path: Path
    format: str
    args: ModelArgs
    mp: int

    def load_into(self, model: Transformer, *, rank: int, shards: int) -> None: ...


def open_checkpoint(path: Path) -> Checkpoint:
    """Detect the format of checkpoint directory ``path``."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint must be a directory")
    if list(path.glob("consolidated.*.pth")):
        return MetaCheckpoint.open(path)
    if (path / "config.json").exists() and list(path.glob("*.safetensors")):
        return HFCheckpoint.open(path)
    raise CheckpointError(f"{path}: neither a Meta checkpoint (consolidated.NN.pth + "
                          f"params.json) nor an HF one (config.json + *.safetensors)")


# --------------------------------------------------------------------------- Meta

def params_json(args: ModelArgs) -> dict[str, Any]:
    """Meta ``params.json`` content for ``args``."""
    out: dict[str, Any] = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
                           "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
                           "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
                           "max_seq_len": args.max_seq_len}
    if args.n_kv_heads is not None:
        out["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        out["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.ffn_hidden_dim is not None:
        out["ffn_hidden_dim"] = args.ffn_hidden_dim  # not Meta's; written only when set
    if args.rope_scaling is not None:  # Meta's Llama-3.1 flag; the other factors are fixed
        out["use_scaled_rope"] = True
        if args.rope_scaling.factor != 8.0:
            out["rope_scaling_factor"] = args.rope_scaling.factor
    return out


@dataclasses.dataclass
class MetaCheckpoint:
    path: Path
    args: ModelArgs
    mp: int
    format: str = "meta"

    @classmethod
    def open(cls, path: Path) -> MetaCheckpoint:
        files = sorted(path.glob("consolidated.*.pth"))
        numbers = sorted(int(m.group(1)) for f in files if (m := _META_FILE.search(f.name)))
        if numbers != list(range(len(numbers))) or not numbers:
            raise CheckpointError(f"{path}: consolidated.NN.pth files must be numbered 00.."
                                  f"{len(files) - 1:02d} without gaps, found {numbers}")
        params_file = path / "params.json"
        if not params_file.exists():
            raise CheckpointError(f"{path}: params.json is missing next to consolidated.*.pth")
        data = _read_json(params_file)
        vocab = int(data.get("vocab_size", -1))
        if vocab <= 0:  # LLaMA-1 writes -1: take it from the embedding
            vocab = int(_load(cls.file(path, 0))["tok_embeddings.weight"].shape[0])
        return cls(path=path, args=args_from_params(data, params_file, vocab), mp=len(numbers))

    @staticmethod
    def file(path: Path, index: int) -> Path:
        return path / f"consolidated.{index:02d}.pth"

    def load_into(self, model: Transformer, *, rank: int, shards: int) -> None:
        states: dict[int, dict[str, torch.Tensor]] = {}

        def state(i: int) -> dict[str, torch.Tensor]:
            if i not in states:
                states[i] = _load(self.file(self.path, i))
            return states[i]

        full = full_shapes(self.args)
        with torch.no_grad():
            for name, param in model.named_parameters():
                d = shard_dim(name)
                pieces = []
                for src, sl in _source_slices(full[name], d, self.mp, rank, shards, self.path):
                    tensor = _get(state(src), name, self.file(self.path, src))
                    want = _shard_shape(full[name], d, self.mp)
                    if tuple(tensor.shape) != want:
                        raise CheckpointError(
                            f"{self.file(self.path, src)}: {name} has shape "
                            f"{tuple(tensor.shape)}, expected {want} for MP{self.mp}")
                    pieces.append(tensor[sl])
                param.copy_(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=d or 0))


def _load(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds
        raise CheckpointError(f"{file}: cannot load ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _get(state: dict[str, torch.Tensor], name: str, file: Path) -> torch.Tensor:
    if name not in state:
        raise CheckpointError(f"{file}: missing tensor {name}")
    return state[name]


def _shard_shape(full: tuple[int, ...], d: int | None, mp: int) -> tuple[int, ...]:
    if d is None:
        return full
    s = list(full)
    s[d] //= mp
    return tuple(s)


def _source_slices(full: tuple[int, ...], d: int | None, src_mp: int, rank: int, shards: int,
                   where: Path) -> list[tuple[int, tuple[slice, ...]]]:
    """(source file, index into its tensor) pairs that make up ``rank``'s shard."""
    if d is None:
        return [(0, (slice(None),))]
    size = full[d]
    if size % src_mp or size % shards:
        raise CheckpointError(f"{where}: dimension {size} splits neither into {src_mp} "
                              f"checkpoint files and {shards} shards")
    src_sz, tgt_sz = size // src_mp, size // shards
    lo, hi = rank * tgt_sz, (rank + 1) * tgt_sz
    out = []
    for src in range(lo // src_sz, (hi - 1) // src_sz + 1):
        a, b = max(lo, src * src_sz) - src * src_sz, min(hi, (src + 1) * src_sz) - src * src_sz
        index = (slice(None),) * d + (slice(a, b),)
        out.append((src, index))
    return out


def save_meta_checkpoint(model_state_full: dict[str, torch.Tensor],
                         params: ModelArgs | dict[str, Any], directory: Path | str,
                         mp: int) -> None:
    """Write a full state dict as a Meta checkpoint of ``mp`` files (+ params.json)."""
    directory = Path(directory)
    data = params_json(params) if isinstance(params, ModelArgs) else dict(params)
    for i in range(mp):
        shard: dict[str, torch.Tensor] = {}
        for name, tensor in model_state_full.items():
            d = shard_dim(name)
            if d is not None and tensor.shape[d] % mp:
                raise CheckpointError(f"{directory}: {name} dimension {tensor.shape[d]} does "
                                      f"not split into {mp} files")
            part = tensor if d is None else tensor.chunk(mp, dim=d)[i]
            shard[name] = part.detach().to("cpu").contiguous().clone()
        with atomic_path(MetaCheckpoint.file(directory, i)) as tmp:
            torch.save(shard, tmp)
    write_json(directory / "params.json", data)


def full_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Gather every parameter's full tensor onto the CPU (collective over MP ranks)."""
    group = get_model_parallel_group()
    world = dist.get_world_size(group=group)
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        d = shard_dim(name)
        if d is None or world == 1:
            out[name] = param.detach().cpu().clone()
            continue
        parts = [torch.empty_like(param) for _ in range(world)]
        dist.all_gather(parts, param.detach().contiguous(), group=group)
        out[name] = torch.cat(parts, dim=d).cpu()
    return out


def save_sharded(model: Transformer, directory: Path | str, *, rank: int) -> None:
    """Each rank writes its own shard as ``consolidated.{rank}.pth``; rank 0 the params."""
    directory = Path(directory)
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    with atomic_path(MetaCheckpoint.file(directory, rank)) as tmp:
        torch.save(state, tmp)
    if rank == 0:
        write_json(directory / "params.json", params_json(model.args))


# --------------------------------------------------------------------------- HF

_HF_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(meta_name: str) -> str:
    """The HF (transformers LLaMA) name of a Meta parameter name."""
    if meta_name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if meta_name == "norm.weight":
        return "model.norm.weight"
    if meta_name == "output.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", meta_name)
    if m is None or m.group(2) not in _HF_LAYER:
        raise KeyError(meta_name)
    return f"model.layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.weight"


def _rotary_heads(meta_name: str, args: ModelArgs) -> int | None:
    if meta_name.endswith("attention.wq.weight"):
        return args.n_heads
    if meta_name.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary layout → HF's half-split layout (per head)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split rotary layout → Meta's interleaved layout (per head)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


@dataclasses.dataclass
class HFCheckpoint:
    path: Path
    args: ModelArgs
    mp: int = 1
    format: str = "hf"
    tied: bool = False

    @classmethod
    def open(cls, path: Path) -> HFCheckpoint:
        cfg = _read_json(path / "config.json")
        return cls(path=path, args=args_from_hf_config(cfg, path / "config.json"),
                   tied=bool(cfg.get("tie_word_embeddings", False)))

    def _index(self) -> dict[str, Path]:
        """Tensor name -> file: from ``model.safetensors.index.json`` when there is one,
        else from the headers of every ``*.safetensors`` file."""
        from safetensors import safe_open

        index: dict[str, Path] = {}
        index_file = self.path / HF_INDEX
        if index_file.exists():
            weight_map = _read_json(index_file).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_file}: no weight_map naming the tensor files")
            return {str(k): self.path / str(v) for k, v in weight_map.items()}
        for file in sorted(self.path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    index[key] = file
        return index

    def load_into(self, model: Transformer, *, rank: int, shards: int) -> None:
        from safetensors import safe_open

        index = self._index()
        full = full_shapes(self.args)
        with torch.no_grad():
            for name, param in model.named_parameters():
                key = hf_name(name)
                if key == "lm_head.weight" and key not in index and self.tied:
                    key = "model.embed_tokens.weight"
                if key not in index:
                    raise CheckpointError(f"{self.path}: missing tensor {key} (for {name})")
                with safe_open(str(index[key]), framework="pt") as fh:
                    sl = fh.get_slice(key)
                    shape = tuple(sl.get_shape())
                    if shape != full[name]:
                        raise CheckpointError(f"{index[key]}: {key} has shape {shape}, "
                                              f"expected {full[name]}")
                    d = shard_dim(name)
                    if d is None:
                        tensor = sl[:]
                    else:
                        size = full[name][d] // shards
                        lo, hi = rank * size, (rank + 1) * size
                        tensor = sl[lo:hi] if d == 0 else sl[:, lo:hi]
                heads = _rotary_heads(name, self.args)
                if heads is not None:
                    tensor = hf_unpermute(tensor, heads // shards)
                param.copy_(tensor)


def hf_config(args: ModelArgs, *, bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Any]:
    """An HF LLaMA ``config.json`` for ``args`` (the fields transformers' LlamaConfig reads)."""
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim, "hidden_act": "silu",
        "intermediate_size": args.hidden_dim, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta, "rope_scaling": None, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}
    if args.rope_scaling is not None:
        r = args.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor,
                               "low_freq_factor": r.low_freq_factor,
                               "high_freq_factor": r.high_freq_factor,
                               "original_max_position_embeddings": r.original_max_seq_len}
    if bos_id is not None:
        out["bos_token_id"] = bos_id
    if eos_id is not None:
        out["eos_token_id"] = eos_id
    return out


def save_hf_checkpoint(model_state_full: dict[str, torch.Tensor], args: ModelArgs,
                       directory: Path | str, *, n_files: int = 1,
                       config: dict[str, Any] | None = None) -> None:
    """Write a full Meta-named state dict as an HF LLaMA checkpoint.

    One ``model.safetensors`` file, or with ``n_files > 1`` the layout of HF's larger
    repositories: ``model-0000K-of-0000N.safetensors`` (whole tensors, layers in order)
    and ``model.safetensors.index.json`` naming each tensor's file.  q/k projections are
    permuted to HF's half-split rotary layout.  ``config``: extra ``config.json`` keys.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model_state_full.items():
        heads = _rotary_heads(name, args)
        t = tensor.detach().cpu()
        tensors[hf_name(name)] = (t if heads is None else hf_permute(t, heads)).contiguous()
    names = list(tensors)
    if n_files < 1 or n_files > len(names):
        raise CheckpointError(f"{directory}: cannot write {len(names)} tensors into {n_files} files")
    if n_files == 1:
        groups = {"model.safetensors": names}
    else:
        per = -(-len(names) // n_files)
        groups = {f"model-{k + 1:05d}-of-{n_files:05d}.safetensors": names[k * per:(k + 1) * per]
                  for k in range(n_files)}
    for file, members in groups.items():
        with atomic_path(directory / file) as tmp:
            save_file({n: tensors[n] for n in members}, str(tmp), metadata={"format": "pt"})
    if n_files > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(directory / HF_INDEX, {
            "metadata": {"total_size": total},
            "weight_map": {n: file for file, members in groups.items() for n in members}})
    write_json(directory / "config.json", hf_config(args) | (config or {}))
