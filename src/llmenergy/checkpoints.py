"""Checkpoint folders and tokenizers as released, inspected without torch.

Config validation and planning (which run every time Snakemake parses the
workflow) call these: :func:`inspect_checkpoint` judges a checkpoint by its JSON,
its file sizes and its tensor headers, never by loading weights;
:func:`resolve_tokenizer` finds the tokenizer where the releases put it (the
weights folder, its parent as in Meta's LLaMA-1 release, or the configured path).
"""
from __future__ import annotations

import io
import json
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmenergy.arch import LLAMA3_ROPE_SCALING, ModelArgs, RopeScaling
from llmenergy.errors import CheckpointError

log = logging.getLogger(__name__)

META_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")
HF_INDEX = "model.safetensors.index.json"
STRUCTURAL = ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "rope_theta", "rope_scaling")
#: the begin/end-of-sequence tokens of LLaMA-1/2 (sentencepiece) and Llama-3 (tiktoken-style BPE)
SPECIAL_TOKENS = (("<s>", "</s>"), ("<|begin_of_text|>", "<|end_of_text|>"))
#: a torch file from before the zip format (torch < 1.6) starts with this pickled magic number
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found, without loading a tensor."""

    path: Path
    format: str  # "meta" or "hf"
    args: ModelArgs  # as the checkpoint describes itself
    files: tuple[Path, ...]  # the weight files (Meta shards in order, or HF safetensors)
    vocab_size: int | None  # from params.json/config.json or the embedding; None: unknown

    @property
    def mp(self) -> int:
        """Model-parallel degree the weights were saved with (an HF checkpoint is unsharded)."""
        return len(self.files) if self.format == "meta" else 1


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _need(data: dict[str, Any], key: str, where: Path) -> Any:
    if key not in data:
        raise CheckpointError(f"{where}: missing key {key!r}")
    return data[key]


def args_from_params(data: dict[str, Any], where: Path, vocab_size: int) -> ModelArgs:
    """The architecture a Meta ``params.json`` describes (``vocab_size`` given separately)."""
    try:
        return ModelArgs(
            dim=int(_need(data, "dim", where)), n_layers=int(_need(data, "n_layers", where)),
            n_heads=int(_need(data, "n_heads", where)), vocab_size=vocab_size,
            n_kv_heads=data.get("n_kv_heads"), multiple_of=int(data.get("multiple_of", 256)),
            ffn_dim_multiplier=data.get("ffn_dim_multiplier"),
            ffn_hidden_dim=data.get("ffn_hidden_dim"), norm_eps=float(data.get("norm_eps", 1e-6)),
            max_seq_len=int(data.get("max_seq_len", 2048)),
            rope_theta=float(data.get("rope_theta", 10000.0)),
            rope_scaling=_meta_rope_scaling(data))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: a value is not a number ({exc})") from None


def _meta_rope_scaling(data: dict[str, Any]) -> RopeScaling | None:
    """Meta's ``use_scaled_rope: true`` (Llama-3.1+), with its fixed factors unless
    ``rope_scaling_factor`` (Llama-3.2's 32) says otherwise."""
    if not data.get("use_scaled_rope"):
        return None
    factor = data.get("rope_scaling_factor")
    return LLAMA3_ROPE_SCALING if factor is None else RopeScaling(factor=float(factor))


def _hf_rope(data: dict[str, Any], where: Path) -> tuple[float, RopeScaling | None]:
    """``rope_theta`` and ``rope_scaling`` of an HF config (``rope_scaling``, or the
    ``rope_parameters`` of transformers 5, which carries ``rope_theta`` too)."""
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or params
    key = "rope_scaling" if data.get("rope_scaling") else "rope_parameters"
    theta = float(data.get("rope_theta", params.get("rope_theta", 10000.0)))
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{where}: {key} must be a mapping, not {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(f"{where}: {key}.rope_type {kind!r} is not supported (default or llama3)")
    return theta, RopeScaling(
        factor=float(_need(scaling, "factor", where)),
        low_freq_factor=float(_need(scaling, "low_freq_factor", where)),
        high_freq_factor=float(_need(scaling, "high_freq_factor", where)),
        original_max_seq_len=int(_need(scaling, "original_max_position_embeddings", where)))


def args_from_hf_config(data: dict[str, Any], where: Path) -> ModelArgs:
    """The architecture an HF LLaMA ``config.json`` describes."""
    try:
        n_heads = int(_need(data, "num_attention_heads", where))
        kv = data.get("num_key_value_heads")
        theta, scaling = _hf_rope(data, where)
        return ModelArgs(
            dim=int(_need(data, "hidden_size", where)),
            n_layers=int(_need(data, "num_hidden_layers", where)), n_heads=n_heads,
            vocab_size=int(_need(data, "vocab_size", where)),
            n_kv_heads=None if kv is None or int(kv) == n_heads else int(kv),
            ffn_hidden_dim=int(_need(data, "intermediate_size", where)),
            norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(data.get("max_position_embeddings", 2048)),
            rope_theta=theta, rope_scaling=scaling)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: a value is not a number ({exc})") from None


#: the file's own name of each STRUCTURAL field, by format (for messages)
_KEYS = {
    "meta": {"dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "kv_heads": "n_kv_heads",
             "hidden_dim": "feed-forward width (ffn_dim_multiplier, multiple_of)",
             "rope_theta": "rope_theta", "rope_scaling": "use_scaled_rope"},
    "hf": {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size",
           "rope_theta": "rope_theta", "rope_scaling": "rope_scaling"},
}


def _shown(value: object) -> str:
    if isinstance(value, RopeScaling):
        return (f"llama3 (factor {value.factor:g}, low/high {value.low_freq_factor:g}/"
                f"{value.high_freq_factor:g}, original {value.original_max_seq_len})")
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _compare(path: Path, found: ModelArgs, args: ModelArgs, fmt: str) -> list[str]:
    """One line per field in which the checkpoint's architecture differs from ``args``."""
    return [f"{path}: checkpoint does not match the architecture: {_KEYS[fmt][k]} "
            f"{_shown(getattr(found, k))} (arch has {_shown(getattr(args, k))})"
            for k in STRUCTURAL if getattr(found, k) != getattr(args, k)]


def _nonempty(file: Path, what: str) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file}: {what} is missing")
    if file.stat().st_size == 0:
        raise CheckpointError(f"{file}: {what} is empty (0 bytes)")


def inspect_checkpoint(path: str | Path, args: ModelArgs) -> CheckpointInfo:
    """Check checkpoint directory ``path`` against ``args`` without loading weights.

    Meta: ``params.json`` matches ``args``; ``consolidated.NN.pth`` are numbered without
    gaps, non-empty, readable torch archives whose embedding has the expected shape.
    HF: ``config.json`` matches; every safetensors file (those the index names, if
    any) is present, with a whole header and the tensors the index puts in it.
    Raises :class:`CheckpointError` whose message has one line per problem found
    (every mismatched key, every bad file), each naming the file.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if list(p.glob("consolidated.*.pth")):
        return _inspect_meta(p, args)
    if (p / "config.json").exists() and (list(p.glob("*.safetensors")) or (p / HF_INDEX).exists()):
        return _inspect_hf(p, args)
    raise CheckpointError(f"{path}: neither a Meta checkpoint (consolidated.NN.pth + params.json) "
                          f"nor an HF one (config.json + *.safetensors)")


def _raise_if(problems: list[str]) -> None:
    """Raise one error, one line per problem; the same problem in several files of a
    checkpoint (every shard cut off, say) is one line naming the first file."""
    if not problems:
        return
    groups: dict[str, list[str]] = {}
    for line in problems:
        where, _, what = line.partition(": ")
        groups.setdefault(what, []).append(where)
    lines = []
    for what, wheres in groups.items():
        more = len(wheres) - 1
        lines.append(f"{wheres[0]}{f' (and {more} more file' + ('s' if more > 1 else '') + ')' if more else ''}: {what}")
    raise CheckpointError("\n".join(lines))


def _inspect_meta(p: Path, args: ModelArgs) -> CheckpointInfo:
    meta = p / "params.json"
    if not meta.exists():
        raise CheckpointError(f"{p}: Meta checkpoint without params.json")
    params = read_json(meta)
    try:
        vocab = int(params.get("vocab_size", -1) or -1)  # LLaMA-1 writes -1
    except (TypeError, ValueError):
        raise CheckpointError(f"{meta}: vocab_size {params['vocab_size']!r} is not a number") from None
    found = args_from_params(params, meta, vocab)
    problems = _compare(p, found, args, "meta")
    numbers = sorted(int(m.group(1)) for f in p.glob("consolidated.*.pth")
                     if (m := META_SHARD_RE.search(f.name)))
    if numbers != list(range(len(numbers))):
        problems.append(f"{p}: consolidated.NN.pth files must be numbered 00.."
                        f"{len(numbers) - 1:02d} without gaps, found {numbers}")
        _raise_if(problems)
    files = tuple(p / f"consolidated.{i:02d}.pth" for i in numbers)
    mp = len(files)
    for file in files:
        try:
            _nonempty(file, "checkpoint shard")
            shapes = pth_tensor_shapes(file)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        emb = None if shapes is None else shapes.get("tok_embeddings.weight")
        if shapes is not None and emb is None:
            problems.append(f"{file}: no tensor tok_embeddings.weight")
            continue
        if emb is None:
            continue  # legacy format: shapes unknown until loaded
        want_vocab = vocab if vocab > 0 else emb[0]
        want = (want_vocab, args.dim // mp)
        if tuple(emb) != want:
            problems.append(f"{file}: tok_embeddings.weight has shape {tuple(emb)}, "
                            f"expected {want} for {mp} file(s) of dim {args.dim}")
            continue
        vocab = want_vocab
    _raise_if(problems)
    return CheckpointInfo(path=p, format="meta", args=found.replace(vocab_size=vocab),
                          files=files, vocab_size=vocab if vocab > 0 else None)


def _inspect_hf(p: Path, args: ModelArgs) -> CheckpointInfo:
    cfg = p / "config.json"
    found = args_from_hf_config(read_json(cfg), cfg)
    problems = _compare(cfg, found, args, "hf")
    index = p / HF_INDEX
    wanted: dict[Path, set[str]] = {}
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("\n".join([*problems, f"{index}: no weight_map naming the tensor files"]))
        for tensor, name in weight_map.items():
            wanted.setdefault(p / str(name), set()).add(str(tensor))
    else:
        wanted = {f: set() for f in sorted(p.glob("*.safetensors"))}
    for file, tensors in wanted.items():
        try:
            _nonempty(file, "safetensors file" + (f" named by {HF_INDEX}" if tensors else ""))
            header = safetensors_header(file)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        missing = sorted(tensors - header.keys())
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            problems.append(f"{file}: missing tensor {missing[0]}{more} (named by {HF_INDEX})")
        emb = header.get("model.embed_tokens.weight")
        if emb is not None:
            shape = tuple(int(n) for n in emb.get("shape", ()))
            if shape != (found.vocab_size, args.dim):
                problems.append(f"{file}: model.embed_tokens.weight has shape {shape}, "
                                f"expected ({found.vocab_size}, {args.dim})")
    _raise_if(problems)
    return CheckpointInfo(path=p, format="hf", args=found, files=tuple(wanted), vocab_size=found.vocab_size)


def safetensors_header(file: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets).

    Reads only the header; a file shorter than its header says (a cut-off download)
    is an error.
    """
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or n > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{file}: not a safetensors file (bad header length)")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read the safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a table)")
    header.pop("__metadata__", None)
    end = max((int(t.get("data_offsets", (0, 0))[1]) for t in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated: {size} bytes, its header needs {8 + n + end}")
    return header


class _Opaque:
    """Stands in for every class a torch pickle names that we do not need."""

    def __new__(cls, *args: object, **kwargs: object) -> _Opaque:
        return super().__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


@dataclass(frozen=True)
class _TensorShape:
    shape: tuple[int, ...]


def _rebuild_tensor(storage: object, offset: object, size: object, *rest: object) -> _TensorShape:
    return _TensorShape(tuple(int(n) for n in size))  # type: ignore[attr-defined]


def _rebuild_parameter(data: object, *rest: object) -> object:
    return data


def pth_tensor_shapes(file: Path) -> dict[str, tuple[int, ...]] | None:
    """Shapes of the tensors in a ``torch.save`` zip file, from its pickle only (no torch).

    None for the legacy (pre-zip) format. The pickle is read with an unpickler that
    builds nothing but dicts and shape records, so no code in the file runs.
    """

    class ShapeUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "torch._utils" and name.startswith("_rebuild_tensor"):
                return _rebuild_tensor
            if module == "torch._utils" and name == "_rebuild_parameter":
                return _rebuild_parameter
            if module == "collections" and name == "OrderedDict":
                return dict
            return _Opaque

        def persistent_load(self, pid: Any) -> Any:
            return pid

    try:
        with zipfile.ZipFile(file) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise CheckpointError(f"{file}: not a torch checkpoint (no data.pkl in the archive)")
            raw = archive.read(names[0])
    except zipfile.BadZipFile:
        with open(file, "rb") as fh:
            if fh.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC:
                return None
        raise CheckpointError(f"{file}: not a torch checkpoint (not a zip archive: cut off "
                              f"or corrupt?)") from None
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from None
    try:
        state = ShapeUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:  # noqa: BLE001 - a pickle we cannot follow: not a verdict
        log.debug("%s: tensor index not readable without torch (%s)", file, exc)
        return None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a state dict (a {type(state).__name__})")
    return {str(k): v.shape for k, v in state.items() if isinstance(v, _TensorShape)}


# ------------------------------------------------------------------ tokenizers

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _tokenizer_in(directory: Path) -> Path | None:
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def resolve_tokenizer(weights: str, tokenizer: str | None, *,
                      key: str = "the model's 'tokenizer' key") -> Path | None:
    """The tokenizer file a model uses, looked for where the releases put it.

    ``tokenizer`` (a file, or a directory holding one) when given; else the weights
    directory's ``tokenizer.model``/``tokenizer.json``, else its parent's (Meta's
    LLaMA-1 release: ``LLaMA/tokenizer.model`` beside ``LLaMA/7B/``). None for
    synthetic weights with no tokenizer named: the project's own is used. ``key``
    names the config key to suggest when none is found.
    """
    if tokenizer:
        t = Path(tokenizer)
        if t.is_dir():
            found = _tokenizer_in(t)
            if found is None:
                raise CheckpointError(f"{t}: no tokenizer.model or tokenizer.json in this directory")
            return found
        if not t.is_file():
            raise CheckpointError(f"{t}: tokenizer file not found")
        return t
    if weights == "synthetic":
        return None
    w = Path(weights)
    parent = w.absolute().parent
    for directory in (w, parent):
        found = _tokenizer_in(directory)
        if found is not None:
            return found
    raise CheckpointError(f"no tokenizer.model or tokenizer.json in {w} or in its parent {parent}; "
                          f"name the file with {key}")


def tokenizer_vocab_size(path: Path) -> int:
    """Number of ids tokenizer file ``path`` can produce; loads it (sentencepiece or
    ``tokenizers``) the way the worker will, so a file that does not load fails here."""
    try:
        if path.suffix == ".json":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            special_tokens(path, tok.token_to_id)
            return int(tok.get_vocab_size(with_added_tokens=True))
        if _is_tiktoken(path):
            raise CheckpointError(f"{path}: a tiktoken BPE file (Meta's Llama-3 release) is not read "
                                  f"here; name the HF tokenizer.json instead")
        import sentencepiece as spm

        return int(spm.SentencePieceProcessor(model_file=str(path)).vocab_size())
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - both libraries raise plain RuntimeErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: tokenizer does not load ({first})") from None


def special_tokens(path: Path, token_to_id: Any) -> tuple[int, int]:
    """Ids of the begin/end-of-sequence tokens of a ``tokenizer.json`` (LLaMA-1/2's
    ``<s>``/``</s>`` or Llama-3's ``<|begin_of_text|>``/``<|end_of_text|>``)."""
    for bos, eos in SPECIAL_TOKENS:
        ids = token_to_id(bos), token_to_id(eos)
        if ids[0] is not None and ids[1] is not None:
            return int(ids[0]), int(ids[1])
    names = " or ".join(f"{b!r}/{e!r}" for b, e in SPECIAL_TOKENS)
    raise CheckpointError(f"{path}: tokens {names} not in vocabulary")


def _is_tiktoken(path: Path) -> bool:
    """Whether ``path`` is a tiktoken BPE file (lines of base64 token and rank)."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline(4096).split()
    except OSError:
        return False
    return len(first) == 2 and first[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]) is not None


def check_tokenizer(weights: str, tokenizer: str | None, vocab_size: int, *,
                    key: str = "the model's 'tokenizer' key") -> Path | None:
    """Resolve the tokenizer (:func:`resolve_tokenizer`), load it, and check that its ids
    fit an embedding of ``vocab_size`` rows; return its path (None: the project's own)."""
    path = resolve_tokenizer(weights, tokenizer, key=key)
    if path is None:
        return None
    n_words = tokenizer_vocab_size(path)
    if n_words > vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {n_words} ids but the model's vocabulary "
                              f"has {vocab_size} rows")
    return path
