"""Load and validate ``config.yaml`` into typed objects.

Two layers: a JSON schema (structure, types, unknown keys) and semantic checks
(names that refer to each other, ranges, files). Every problem becomes one
:class:`~llmenergy.errors.ConfigError` line naming the file and the key, e.g.
``config.yaml: matrix[1].batch_size: -4 must be a positive integer``.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from llmenergy.arch import DEFAULT_PRECISION, ENGINES, PRECISION_DTYPE, PRECISIONS, SIZES, ModelArgs
from llmenergy.data.prompts import DatasetSpec
from llmenergy.errors import ConfigError
from llmenergy.slurm import TIME_LIMIT_WARNING_S

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
#: The ``collector.backend`` values (the collector process also takes ``replay``).
COLLECTOR_BACKENDS = ("auto", "dcgm", "nvml", "rapl", "estimate", "none")
#: Instant-power sampling period between full samples (NVML).
DEFAULT_POWER_INTERVAL_MS = 40
#: The value of each matrix axis a group leaves out (the planner's and the checks' one default).
AXIS_DEFAULTS: dict[str, list[Any]] = {
    "shards": [1], "batch_size": [1], "max_gen_len": [256], "power_cap_w": [None], "engine": ["reference"],
    "precision": [DEFAULT_PRECISION],
}
SCHEMA_PATH = Path(str(resources.files("llmenergy") / "schemas" / "config.schema.json"))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    args: ModelArgs
    weights: str = "synthetic"
    tokenizer: str | None = None
    dtype: str = "auto"
    stop_at_eos: bool = False


@dataclass(frozen=True)
class GpuSpec:
    name: str
    partition: str
    gpus_per_node: int
    memory_gb: float
    constraint: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus_per_gpu: int = 4
    mem_mb_per_gpu: int | None = None
    device: str = "cuda"
    tdp_w: float | None = None
    min_power_w: float | None = None
    max_power_w: float | None = None
    mem_bandwidth_gbs: float = 900.0
    compute_capability: float | None = None  # None: from the name (arch.KNOWN_COMPUTE_CAPABILITY)
    max_time_min: int | None = None  # the longest job the partition accepts (besides Slurm's MaxTime)


@dataclass(frozen=True)
class CollectorSpec:
    backend: str = "auto"
    interval_ms: int = 100
    power_interval_ms: int = DEFAULT_POWER_INTERVAL_MS
    idle_baseline_s: float = 5.0
    idle_settle_s: float = 2.0  # the wait between the load and the idle window
    #: a repeat's prefill+decode windows last at least this long: its batches are cycled
    min_window_s: float = 20.0
    #: each repeat's prefill-only loop lasts at least this long (and 10 × interval_ms); 0: none
    prefill_window_s: float = 5.0
    estimate_tdp_w: float | None = None
    dcgm_host: str | None = None

    def prefill_loop_s(self) -> float:
        """How long each repeat's prefill-only loop lasts at least: ``prefill_window_s``, and
        at least 10 collector intervals (the sensor's update period, as the analysis measures
        it, is no shorter than the poll interval); 0 when the loop is off."""
        if self.prefill_window_s <= 0:
            return 0.0
        return max(self.prefill_window_s, 10 * self.interval_ms / 1000)


@dataclass(frozen=True)
class Policies:
    on_oom: str = "record"
    on_power_cap_denied: str = "fail"
    on_config_change: str = "rerun"  # a finished cell of another fingerprint: rerun | error


@dataclass(frozen=True)
class Config:
    source: str
    models: dict[str, ModelSpec]
    datasets: dict[str, DatasetSpec]
    gpus: dict[str, GpuSpec]
    matrix: list[dict[str, list[Any]]]
    repeats: int = 1
    seed: int = 0
    output_dir: str = "results"
    warmup_tokens: int = 8
    collector: CollectorSpec = field(default_factory=CollectorSpec)
    policies: Policies = field(default_factory=Policies)
    grid_gco2_per_kwh: float | None = None
    #: ``group``: one Slurm job per group of cells sharing a model load; ``cell``: one per cell;
    #: None: the route's default, ``group`` on every route (``planning.groups.resolve_packing``).
    packing: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _key_path(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _schema_errors(data: dict[str, Any], source: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return
    err = errors[0]
    path = list(err.absolute_path)
    if len(path) >= 3 and path[0] == "matrix" and isinstance(path[-1], int):
        path = path[:-1]  # matrix[1].batch_size[0] reads better as matrix[1].batch_size
    where = _key_path(path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        raise ConfigError(f"{source}: {where}: unknown key {extra[0]!r}" if extra else f"{source}: {where}: {err.message}")
    if err.validator == "type":
        raise ConfigError(f"{source}: {where}: {err.instance!r} must be of type {err.validator_value}")
    if err.validator in ("minimum", "exclusiveMinimum") and isinstance(err.instance, int) and \
            err.schema.get("type") == "integer":
        raise ConfigError(f"{source}: {where}: {err.instance!r} must be a positive integer")
    if err.validator == "required":
        raise ConfigError(f"{source}: {where}: {err.message}")
    raise ConfigError(f"{source}: {where}: {err.message}")


def _name(source: str, key: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(f"{source}: {key}: name {name!r} may only contain letters, digits, '.', '_' and '-'")
    return name


def _models(raw: dict[str, Any], source: str) -> dict[str, ModelSpec]:
    out: dict[str, ModelSpec] = {}
    for name, m in raw.items():
        _name(source, f"models.{name}", name)
        arch = m.get("arch", name)
        if arch not in SIZES:
            raise ConfigError(f"{source}: models.{name}.arch: unknown architecture {arch!r} (known: {', '.join(SIZES)})")
        args = SIZES[arch]
        if "max_seq_len" in m:
            args = args.replace(max_seq_len=int(m["max_seq_len"]))
        out[name] = ModelSpec(
            name=name, arch=arch, args=args, weights=str(m.get("weights", "synthetic")),
            tokenizer=m.get("tokenizer"), dtype=m.get("dtype", "auto"), stop_at_eos=bool(m.get("stop_at_eos", False)),
        )
    return out


def _datasets(raw: dict[str, Any], source: str) -> dict[str, DatasetSpec]:
    out: dict[str, DatasetSpec] = {}
    for name, d in raw.items():
        _name(source, f"datasets.{name}", name)
        if d.get("kshot", 0) and not d.get("train_path"):
            raise ConfigError(f"{source}: datasets.{name}.kshot: needs datasets.{name}.train_path")
        out[name] = DatasetSpec(name=name, **d)
    return out


def _gpus(raw: dict[str, Any], source: str) -> dict[str, GpuSpec]:
    out: dict[str, GpuSpec] = {}
    for name, g in raw.items():
        _name(source, f"gpus.{name}", name)
        spec = GpuSpec(name=name, **g)
        for key in ("partition", "constraint", "account", "qos"):
            value = getattr(spec, key)
            if value is not None and not NAME_RE.match(str(value).replace(",", "").replace("&", "").replace("|", "")):
                raise ConfigError(f"{source}: gpus.{name}.{key}: {value!r} has characters a Slurm name cannot have")
        if spec.max_time_min is not None and spec.max_time_min * 60 <= TIME_LIMIT_WARNING_S:
            raise ConfigError(f"{source}: gpus.{name}.max_time_min: {spec.max_time_min} must be more than "
                              f"{TIME_LIMIT_WARNING_S // 60} minutes (every job gets its stop signal "
                              f"{TIME_LIMIT_WARNING_S} s before its time limit)")
        if spec.min_power_w and spec.max_power_w and spec.min_power_w > spec.max_power_w:
            raise ConfigError(f"{source}: gpus.{name}.min_power_w: {spec.min_power_w} exceeds max_power_w {spec.max_power_w}")
        out[name] = spec
    return out


def _check_matrix(cfg: Config) -> None:
    src = cfg.source
    if not cfg.matrix:
        raise ConfigError(f"{src}: matrix: is empty; add at least one group")
    refs = {"model": cfg.models, "dataset": cfg.datasets, "gpu": cfg.gpus}
    for i, group in enumerate(cfg.matrix):
        for axis in ("model", "dataset", "gpu"):
            if axis not in group:
                raise ConfigError(f"{src}: matrix[{i}]: missing axis '{axis}'")
            for v in group[axis]:
                if v not in refs[axis]:
                    raise ConfigError(f"{src}: matrix[{i}].{axis}: unknown {axis} {v!r} (define it under {axis}s)")
        for axis, values in group.items():
            if len(values) != len(set(map(str, values))):
                raise ConfigError(f"{src}: matrix[{i}].{axis}: duplicate value in {values!r}")
        for v in group.get("engine", AXIS_DEFAULTS["engine"]):
            if v not in ENGINES:
                raise ConfigError(f"{src}: matrix[{i}].engine: unknown engine {v!r} (known: {', '.join(ENGINES)})")
        for v in group.get("precision", AXIS_DEFAULTS["precision"]):
            if v not in PRECISIONS:
                raise ConfigError(f"{src}: matrix[{i}].precision: unknown precision {v!r} "
                                  f"(known: {', '.join(PRECISIONS)})")
            for m in group["model"]:
                dtype = cfg.models[m].dtype
                if v in ("fp16", "bf16") and dtype not in ("auto", PRECISION_DTYPE[v]) and "precision" in group:
                    raise ConfigError(f"{src}: matrix[{i}].precision: {v} contradicts models.{m}.dtype "
                                      f"{dtype} (precision sets the dtype; leave dtype auto)")
        default = "" if "max_gen_len" in group else " (the default)"
        for gen in group.get("max_gen_len", AXIS_DEFAULTS["max_gen_len"]):
            for m in group["model"]:
                for d in group["dataset"]:
                    ctx = cfg.models[m].args.max_seq_len
                    if gen + cfg.datasets[d].max_prompt_len > ctx:
                        raise ConfigError(
                            f"{src}: matrix[{i}].max_gen_len: {gen}{default} + datasets.{d}.max_prompt_len "
                            f"{cfg.datasets[d].max_prompt_len} exceeds {m}'s context of {ctx} tokens")
        for cap in group.get("power_cap_w", AXIS_DEFAULTS["power_cap_w"]):
            if cap is None:
                continue
            for g in group["gpu"]:
                spec = cfg.gpus[g]
                lo, hi = spec.min_power_w, spec.max_power_w
                if (lo is not None and cap < lo) or (hi is not None and cap > hi):
                    raise ConfigError(f"{src}: matrix[{i}].power_cap_w: {cap} W is outside gpus.{g}'s range {lo}–{hi} W")


def _check_files(cfg: Config) -> None:
    """Files the config names: checkpoints (headers and sizes only, no weights loaded),
    their tokenizers (loaded: they are small), and datasets.

    Every problem is found before raising: one :class:`ConfigError` whose message has
    one line per problem, each naming the config key.
    """
    src = cfg.source
    from llmenergy.checkpoints import check_tokenizer, inspect_checkpoint
    from llmenergy.data.prompts import check_dataset
    from llmenergy.errors import CheckpointError, DatasetError

    problems: list[str] = []

    def note(key: str, exc: Exception) -> None:
        problems.extend(f"{src}: {key}: {line}" for line in str(exc).splitlines() if line.strip())

    for name, m in cfg.models.items():
        vocab = m.args.vocab_size
        if m.weights != "synthetic":
            try:
                info = inspect_checkpoint(m.weights, m.args)
                vocab = info.vocab_size or vocab
            except CheckpointError as exc:
                note(f"models.{name}.weights", exc)
        key = "tokenizer" if m.tokenizer else "weights"
        if not m.tokenizer and m.weights != "synthetic" and not Path(m.weights).is_dir():
            continue  # reported above; where the tokenizer should be follows from it
        try:
            check_tokenizer(m.weights, m.tokenizer, vocab, key=f"models.{name}.tokenizer")
        except CheckpointError as exc:
            note(f"models.{name}.{key}", exc)
    for name, d in cfg.datasets.items():
        missing = False
        for key in ("path", "train_path"):
            value = getattr(d, key)
            if value and value != "synthetic" and not Path(value).exists():
                problems.append(f"{src}: datasets.{name}.{key}: file {value!r} does not exist")
                missing = True
        if d.path != "synthetic" and not missing:
            try:
                check_dataset(d)
            except DatasetError as exc:
                note(f"datasets.{name}.path", exc)
    if problems:
        raise ConfigError("\n".join(problems))


def from_dict(data: dict[str, Any], *, source: str = "config.yaml", check_files: bool = True) -> Config:
    """Validate a config mapping (as loaded from YAML) and return a :class:`Config`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of keys to values")
    _schema_errors(data, source)
    for i, group in enumerate(data["matrix"]):
        for axis, values in group.items():
            if isinstance(values, list) and not values:
                raise ConfigError(f"{source}: matrix[{i}].{axis}: is empty")
    cfg = Config(
        source=source,
        models=_models(data["models"], source),
        datasets=_datasets(data["datasets"], source),
        gpus=_gpus(data["gpus"], source),
        matrix=[{k: list(v) for k, v in g.items()} for g in data["matrix"]],
        repeats=data.get("repeats", 1),
        seed=data.get("seed", 0),
        output_dir=data.get("output_dir", "results"),
        warmup_tokens=data.get("warmup_tokens", 8),
        collector=CollectorSpec(**data.get("collector", {})),
        policies=Policies(**data.get("policies", {})),
        grid_gco2_per_kwh=data.get("grid_gco2_per_kwh"),
        packing=data.get("packing"),
        raw=data,
    )
    if cfg.collector.backend not in COLLECTOR_BACKENDS:
        raise ConfigError(f"{source}: collector.backend: {cfg.collector.backend!r} must be one of "
                          f"{', '.join(COLLECTOR_BACKENDS)}")
    if cfg.collector.backend == "estimate" and not cfg.collector.estimate_tdp_w:
        raise ConfigError(f"{source}: collector.estimate_tdp_w: required when collector.backend is 'estimate'")
    out = Path(cfg.output_dir)
    if ".." in out.parts:
        raise ConfigError(f"{source}: output_dir: {cfg.output_dir!r} may not contain '..'")
    _check_matrix(cfg)
    if check_files:
        _check_files(cfg)
    return cfg


def load(path: str | Path, *, overrides: dict[str, Any] | None = None, check_files: bool = True) -> Config:
    """Read ``path`` (YAML) and validate it."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{p}: {where}: not valid YAML") from None
    if overrides:
        data = {**(data or {}), **overrides}
    return from_dict(data or {}, source=p.name if p.parent == Path(".") else str(p), check_files=check_files)
