"""Dataset specs and prompt loading: the data package's entry points.

``load_prompts(spec)`` reads the dataset file (or generates a synthetic one into a
cache and reads that through the same loader), samples ``n_prompts`` items with the
spec's seed, renders each through its template and orders them.  ``check_dataset``
is the fast variant for config validation: it reads the first few records only.

Paths are used as given; a relative path is relative to the working directory.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmenergy.data import formats, select, synthetic, templates
from llmenergy.data.formats import Gsm8kRecord, Record
from llmenergy.errors import DatasetError

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
CACHE_ENV = "LLMENERGY_DATA_CACHE"
HEAD_RECORDS = 5
# The synthetic train file for k-shot prefixes uses a seed apart from the test items'.
_TRAIN_SEED_OFFSET = 1_000_003
_SYNTHETIC_TRAIN_MIN = 64


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset as a config names it (``datasets.<name>``)."""

    name: str
    format: str  # "alpaca" | "gsm8k"
    path: str  # a file, or "synthetic"
    n_prompts: int
    seed: int = 0
    order: str = "shuffle"  # "shuffle" | "by_length"
    train_path: str | None = None  # gsm8k k-shot examples: a file, or "synthetic"
    kshot: int = 0
    template: str | None = None  # None | "alpaca" | "gsm8k" | "raw"
    max_prompt_len: int = 256  # prompts are cut to their last max_prompt_len tokens

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> DatasetSpec:
        """Build from a config mapping; unknown keys are an error naming the key."""
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        for key in data:
            if key not in known:
                raise DatasetError(
                    f"datasets.{name}.{key}: unknown key; use one of {', '.join(sorted(known))}"
                )
        for key in ("format", "path", "n_prompts"):
            if key not in data:
                raise DatasetError(f"datasets.{name}.{key}: missing (required)")
        return cls(name=name, **data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check the values themselves (no file access)."""
        where = f"datasets.{self.name}"
        if self.format not in formats.FORMATS:
            raise DatasetError(
                f"{where}.format: {self.format!r} must be one of {', '.join(formats.FORMATS)}"
            )
        if not isinstance(self.path, str) or not self.path:
            raise DatasetError(f"{where}.path: must be a file path or 'synthetic'")
        for key in ("n_prompts", "seed", "kshot"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise DatasetError(f"{where}.{key}: {value!r} must be an integer")
        if self.n_prompts <= 0:
            raise DatasetError(f"{where}.n_prompts: {self.n_prompts} must be a positive integer")
        if self.kshot < 0:
            raise DatasetError(f"{where}.kshot: {self.kshot} must be zero or positive")
        if self.order not in select.ORDERS:
            raise DatasetError(
                f"{where}.order: {self.order!r} must be one of {', '.join(select.ORDERS)}"
            )
        family = templates.resolve_family(self.format, self.template, name=self.name)
        if self.kshot > 0:
            if self.format != "gsm8k" or family != "gsm8k":
                raise DatasetError(f"{where}.kshot: k-shot prompts need format and template gsm8k")
            if not self.train_path:
                raise DatasetError(
                    f"{where}.train_path: kshot={self.kshot} needs a train file "
                    f"(a GSM8K file, or 'synthetic')"
                )


@dataclass(frozen=True)
class Prompt:
    """One prompt ready for the model."""

    id: str  # f"{dataset name}-{item position in the file, 0-based, 5 digits}"
    text: str  # the fully templated prompt
    reference: str | None  # gsm8k: the final number; alpaca: the reference output
    template: str  # alpaca | alpaca_no_input | gsm8k_{k}shot | raw


def default_cache_dir() -> Path:
    """``$LLMENERGY_DATA_CACHE``, else ``$XDG_CACHE_HOME/llmenergy/data`` (``~/.cache``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "llmenergy" / "data"


def synthetic_file(fmt: str, n: int, seed: int, cache_dir: Path, *, kind: str = "test") -> Path:
    """Generate (once) a synthetic dataset file in the cache and return its path.

    The file is written atomically, so ranks racing to create it are harmless.
    """
    ext = ".json" if fmt == "alpaca" else ".jsonl"
    path = cache_dir / f"{fmt}-synthetic-{kind}-n{n}-seed{seed}{ext}"
    if not path.exists():
        log.info("generating synthetic %s data: %s", fmt, path)
        writer = synthetic.write_alpaca if fmt == "alpaca" else synthetic.write_gsm8k
        writer(path, n, seed)
    return path


def _data_path(spec: DatasetSpec, cache_dir: Path | None) -> Path:
    if spec.path == SYNTHETIC:
        cache = cache_dir if cache_dir is not None else default_cache_dir()
        return synthetic_file(spec.format, spec.n_prompts, spec.seed, cache)
    return Path(spec.path)


def _train_path(spec: DatasetSpec, cache_dir: Path | None) -> Path:
    if spec.train_path == SYNTHETIC:
        cache = cache_dir if cache_dir is not None else default_cache_dir()
        n = max(spec.kshot, _SYNTHETIC_TRAIN_MIN)
        return synthetic_file("gsm8k", n, spec.seed + _TRAIN_SEED_OFFSET, cache, kind="train")
    return Path(str(spec.train_path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _shots(spec: DatasetSpec, train: Path) -> list[Gsm8kRecord]:
    records = [r for r in formats.read_records(train, "gsm8k") if isinstance(r, Gsm8kRecord)]
    positions = select.sample_positions(
        len(records), spec.kshot, spec.seed, where=f"{train} (kshot)"
    )
    return [records[i] for i in positions]


def load_prompts(spec: DatasetSpec, *, cache_dir: Path | None = None) -> list[Prompt]:
    """The spec's prompts: sampled with its seed, templated, in its order."""
    spec.validate()
    family = templates.resolve_family(spec.format, spec.template, name=spec.name)
    path = _data_path(spec, cache_dir)
    records: list[Record] = formats.read_records(path, spec.format)

    prefix = ""
    pool = list(range(len(records)))
    if spec.kshot > 0:
        train = _train_path(spec, cache_dir)
        shots = _shots(spec, train)
        prefix = templates.kshot_prefix(shots)
        if _same_file(train, path):
            # Never ask a question whose worked answer sits in the prefix.
            pool = select.exclude_positions(len(records), {s.index for s in shots})
    positions = select.sample_positions(len(pool), spec.n_prompts, spec.seed, where=str(path))

    prompts: list[Prompt] = []
    for pos in positions:
        record = records[pool[pos]]
        text, name = templates.render(record, family, prefix=prefix, kshot=spec.kshot)
        reference = record.final if isinstance(record, Gsm8kRecord) else record.output
        prompts.append(Prompt(f"{spec.name}-{record.index:05d}", text, reference, name))
    ordered = select.order_items(prompts, spec.order, lambda p: len(p.text))
    log.info("%s: %d prompts from %s (%s order)", spec.name, len(ordered), path, spec.order)
    return ordered


def check_dataset(spec: DatasetSpec) -> None:
    """Fast check for config validation: values, files exist, first records parse,
    and ``n_prompts`` fits where the record count is cheap to know."""
    spec.validate()
    checks: list[tuple[str, str, int]] = []  # (path, format, records needed)
    if spec.path != SYNTHETIC:
        checks.append((spec.path, spec.format, spec.n_prompts))
    if spec.kshot > 0 and spec.train_path != SYNTHETIC:
        checks.append((str(spec.train_path), "gsm8k", spec.kshot))
    for raw, fmt, needed in checks:
        path = Path(raw)
        if not path.is_file():
            hint = " (see `llmenergy data fetch --help`)" if not path.exists() else ""
            raise DatasetError(f"{path}: dataset file not found{hint}")
        head = formats.head_records(path, fmt, HEAD_RECORDS)
        if not head:
            raise DatasetError(f"{path}: the file holds no records")
        count = formats.count_records(path)
        if count is not None and needed > count:
            raise DatasetError(f"{path}: {needed} items needed but the file has only {count}")

