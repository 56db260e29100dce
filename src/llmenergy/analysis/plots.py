"""Figures of the summary: PNG + SVG per figure, never an empty plot.

Each builder takes the per-repeat summary and returns a matplotlib ``Figure``
(no pyplot, no global state) and a caption, or raises :class:`FigureSkipped`
with the reason. Points are means over the ``ok`` repeats of a cell; error bars
are standard deviations over those repeats. Every title names the power source
of the plotted rows (``power: nvml``, ``power: estimate (ESTIMATE)``...).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from llmenergy.atomic import atomic_path, write_json
from llmenergy.errors import UserError

log = logging.getLogger(__name__)

CONFIG_KEYS = ["model", "dataset", "gpu", "shards", "batch_size", "max_gen_len", "engine"]
MANIFEST = "index.json"


class FigureSkipped(Exception):
    """No data for a figure; the message says why."""


@dataclass
class FigureInfo:
    name: str
    caption: str
    png: Path | None = None
    svg: Path | None = None
    skipped: bool = False
    reason: str | None = None
    power_source: str | None = None


def _ok(summary: pd.DataFrame, *cols: str) -> pd.DataFrame:
    df = summary[summary["status"] == "ok"] if "status" in summary.columns else summary
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise FigureSkipped(f"summary has no column(s) {', '.join(missing)}")
    return df.dropna(subset=list(cols))


def _energy_rows(summary: pd.DataFrame, *cols: str) -> pd.DataFrame:
    df = _ok(summary, *cols)
    if len(df) == 0:
        src = sorted({str(s) for s in summary.get("power_source", pd.Series(dtype=str)).dropna()})
        raise FigureSkipped("no energy data (power source: " + (", ".join(src) or "none")
                            + "): energy columns are empty")
    return df


def _uncapped(df: pd.DataFrame) -> pd.DataFrame:
    """Rows at the default power limit when there are any, else all rows."""
    if "power_cap_w" not in df.columns:
        return df
    default = df[df["power_cap_w"].isna()]
    return default if len(default) else df


def power_label(df: pd.DataFrame) -> str:
    sources = sorted({str(s) for s in df.get("power_source", pd.Series(dtype=str)).dropna()})
    text = "power: " + ("+".join(sources) if sources else "none")
    return text + " (ESTIMATE)" if any("estimate" in s for s in sources) else text


def _points(df: pd.DataFrame, line_keys: list[str], x: str, y: str) -> pd.DataFrame:
    """Mean and std of ``y`` per line and x (over repeats and any other axes)."""
    g = df.groupby(line_keys + [x], dropna=False)[y]
    out = pd.concat([g.mean().rename("mean"), g.std(ddof=1).rename("std"),
                     g.count().rename("n")], axis=1).reset_index()
    return out.sort_values(line_keys + [x])


def _label(keys: list[str], values: tuple) -> str:
    parts = []
    for k, v in zip(keys, values, strict=True):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        parts.append(f"{v} shards" if k == "shards" else f"bs {v}" if k == "batch_size" else str(v))
    return " / ".join(parts)


def _lines(ax, pts: pd.DataFrame, line_keys: list[str], x: str) -> int:  # type: ignore[no-untyped-def]
    n = 0
    for key, grp in pts.groupby(line_keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        ax.errorbar(grp[x].to_numpy(float), grp["mean"].to_numpy(float),
                    yerr=np.nan_to_num(grp["std"].to_numpy(float)), marker="o", capsize=3,
                    label=_label(line_keys, key))
        n += len(grp)
    return n


def _log2_if_wide(ax, values: pd.Series) -> None:  # type: ignore[no-untyped-def]
    v = values.dropna().unique()
    if len(v) >= 3 and v.min() > 0 and v.max() / v.min() >= 8:
        ax.set_xscale("log", base=2)


def fig_throughput(summary: pd.DataFrame) -> tuple[Figure, str]:
    df = _uncapped(_ok(summary, "tokens_per_s", "batch_size"))
    if len(df) == 0:
        raise FigureSkipped("no successful cell with a throughput")
    keys = ["model", "gpu", "shards"]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    _lines(ax, _points(df, keys, "batch_size", "tokens_per_s"), keys, "batch_size")
    _log2_if_wide(ax, df["batch_size"])
    ax.set(xlabel="Batch size (sequences)", ylabel="Throughput (output tokens/s)",
           title=f"Throughput vs batch size ({power_label(df)})")
    ax.legend(fontsize="small")
    return fig, ("Output tokens per second vs batch size, one line per model / GPU / shards; "
                 "mean ± std over repeats, default power limit.")


def fig_power_vs_shards(summary: pd.DataFrame) -> tuple[Figure, str]:
    df = _uncapped(_energy_rows(summary, "avg_power_w", "shards"))
    keys = ["model", "gpu"]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    _lines(ax, _points(df, keys, "shards", "avg_power_w"), keys, "shards")
    ax.set(xlabel="Shards (GPUs)", ylabel="Energy per second (J/s = W, all GPUs)",
           title=f"Energy per second vs shards ({power_label(df)})")
    ax.legend(fontsize="small")
    return fig, ("Average power of all the cell's GPUs during prefill and decode vs number of "
                 "shards; mean ± std over repeats and batch sizes.")


def fig_j_per_token(summary: pd.DataFrame) -> tuple[Figure, str]:
    df = _uncapped(_energy_rows(summary, "j_per_token", "shards", "batch_size"))
    fig = Figure(figsize=(11, 4.5))
    left, right = fig.subplots(1, 2)
    _lines(left, _points(df, ["model", "gpu"], "shards", "j_per_token"), ["model", "gpu"], "shards")
    left.set(xlabel="Shards (GPUs)", ylabel="Energy per output token (J/token)",
             title=f"J/token vs shards ({power_label(df)})")
    keys = ["model", "gpu", "shards"]
    _lines(right, _points(df, keys, "batch_size", "j_per_token"), keys, "batch_size")
    _log2_if_wide(right, df["batch_size"])
    right.set(xlabel="Batch size (sequences)", ylabel="Energy per output token (J/token)",
              title=f"J/token vs batch size ({power_label(df)})")
    left.legend(fontsize="small")
    right.legend(fontsize="small")
    return fig, "Energy per output token vs shards (left) and batch size (right); mean ± std."


def fig_gpu_types(summary: pd.DataFrame) -> tuple[Figure, str]:
    df = _uncapped(_energy_rows(summary, "j_per_token", "gpu"))
    gpus = sorted(df["gpu"].astype(str).unique())
    if len(gpus) < 2:
        raise FigureSkipped(f"only one GPU type in the data ({', '.join(gpus)})")
    cfg = [k for k in CONFIG_KEYS if k not in ("gpu",) and k in df.columns]
    per_cfg = df.groupby(cfg + ["gpu"], dropna=False)[["j_per_token", "tokens_per_s"]].mean()
    per_cfg = per_cfg.reset_index()
    shared = per_cfg.groupby(cfg, dropna=False)["gpu"].transform("nunique") == len(gpus)
    matched = per_cfg[shared]
    if len(matched) == 0:
        raise FigureSkipped("no configuration was run on every GPU type: nothing to compare")
    bars = matched.groupby(["model", "gpu"])[["j_per_token", "tokens_per_s"]].mean().reset_index()
    models = sorted(bars["model"].astype(str).unique())
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    width = 0.8 / len(gpus)
    for ax, col, ylabel in ((axes[0], "j_per_token", "Energy per output token (J/token)"),
                            (axes[1], "tokens_per_s", "Throughput (output tokens/s)")):
        for i, gpu in enumerate(gpus):
            vals = [bars.loc[(bars["model"] == m) & (bars["gpu"] == gpu), col].mean() for m in models]
            ax.bar(np.arange(len(models)) + i * width, vals, width, label=gpu)
        ax.set_xticks(np.arange(len(models)) + width * (len(gpus) - 1) / 2, models)
        ax.set(xlabel="Model", ylabel=ylabel)
        ax.legend(title="GPU", fontsize="small")
    fig.suptitle(f"GPU type vs GPU type on matched configurations ({power_label(df)})")
    return fig, ("Per model, mean over the configurations (shards, batch, length, dataset) that "
                 "ran on every GPU type.")


def fig_power_cap(summary: pd.DataFrame) -> tuple[Figure, str]:
    df = _energy_rows(summary, "energy_j", "duration_s")
    if "power_cap_w" not in df.columns:
        raise FigureSkipped("summary has no power_cap_w column")
    cfg = [k for k in CONFIG_KEYS if k in df.columns]
    df = df.assign(cap=df["power_cap_w"].fillna(-1.0))
    pts = df.groupby(cfg + ["cap"], dropna=False)[["duration_s", "energy_j"]].mean().reset_index()
    pts = pts[pts.groupby(cfg, dropna=False)["cap"].transform("nunique") >= 2]
    if len(pts) == 0:
        raise FigureSkipped("no configuration was run at two or more power caps")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for key, grp in pts.groupby(cfg, dropna=False):
        grp = grp.sort_values("cap")
        ident = dict(zip(cfg, key, strict=True))
        shown = [k for k in ("model", "gpu", "shards", "batch_size") if k in ident]
        ax.plot(grp["duration_s"], grp["energy_j"], marker="o",
                label=_label(shown, tuple(ident[k] for k in shown)))
        for _, row in grp.iterrows():
            text = "default" if row["cap"] < 0 else f"{row['cap']:.0f} W"
            ax.annotate(text, (row["duration_s"], row["energy_j"]), fontsize="x-small",
                        textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="Time per repeat (s)", ylabel="Energy per repeat (J)",
           title=f"Power cap: time vs energy ({power_label(df)})")
    ax.legend(fontsize="small")
    return fig, "Each point is one power cap of one configuration (mean over repeats)."


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated when minimising both x and y, by increasing x."""
    order = np.lexsort((y, x))
    front: list[int] = []
    best = np.inf
    for i in order:
        if y[i] < best:
            front.append(int(i))
            best = y[i]
    return np.array(front, dtype=int)


def fig_pareto(summary: pd.DataFrame) -> tuple[Figure, str]:
    df = _energy_rows(summary, "j_per_token", "latency_p50_s")
    cfg = [k for k in CONFIG_KEYS + ["power_cap_w"] if k in df.columns]
    pts = df.groupby(cfg, dropna=False)[["latency_p50_s", "j_per_token"]].mean().reset_index()
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for model, grp in pts.groupby("model"):
        ax.scatter(grp["latency_p50_s"], grp["j_per_token"], label=str(model), alpha=0.7)
    x, y = pts["latency_p50_s"].to_numpy(float), pts["j_per_token"].to_numpy(float)
    front = pareto_front(x, y)
    ax.step(x[front], y[front], where="post", color="black", linewidth=1, label="Pareto front")
    ax.set(xlabel="Median batch latency, prefill + decode (s)",
           ylabel="Energy per output token (J/token)",
           title=f"Energy vs latency, Pareto front ({power_label(df)})")
    ax.legend(fontsize="small")
    return fig, (f"Each point is one configuration; {len(front)} of {len(pts)} are on the "
                 "front (lower is better on both axes).")


BUILDERS: dict[str, Callable[[pd.DataFrame], tuple[Figure, str]]] = {
    "throughput_vs_batch": fig_throughput,
    "energy_per_second_vs_shards": fig_power_vs_shards,
    "j_per_token_vs_shards_batch": fig_j_per_token,
    "gpu_type_comparison": fig_gpu_types,
    "power_cap_tradeoff": fig_power_cap,
    "pareto_j_per_token_latency": fig_pareto,
}


def figure_power_source(fig: Figure) -> str | None:
    """The ``power: ...`` text of a figure's titles, e.g. ``nvml`` or ``estimate (ESTIMATE)``."""
    titles = [ax.get_title() for ax in fig.axes]
    suptitle = getattr(fig, "_suptitle", None)  # Figure.get_suptitle() needs matplotlib >= 3.8
    if suptitle is not None:
        titles.append(suptitle.get_text())
    for title in titles:
        if "power: " in title:
            return title.split("power: ", 1)[1].rstrip(")").replace(" (ESTIMATE", " (ESTIMATE)")
    return None


def _save(fig: Figure, path: Path, fmt: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight")


def make_figures(summary: pd.DataFrame, outdir: Path) -> list[FigureInfo]:
    """Draw every figure of :data:`BUILDERS` into ``outdir`` (PNG + SVG) and write ``index.json``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    infos: list[FigureInfo] = []
    for name, build in BUILDERS.items():
        try:
            fig, caption = build(summary)
        except FigureSkipped as exc:
            log.info("figure %s skipped: %s", name, exc)
            infos.append(FigureInfo(name, caption="", skipped=True, reason=str(exc)))
            continue
        png, svg = outdir / f"{name}.png", outdir / f"{name}.svg"
        _save(fig, png, "png")
        _save(fig, svg, "svg")
        source = figure_power_source(fig)
        infos.append(FigureInfo(name, caption, png, svg, power_source=source))
    write_json(outdir / MANIFEST, [asdict(i) for i in infos])
    return infos


def load_manifest(outdir: Path) -> list[FigureInfo] | None:
    import json

    path = Path(outdir) / MANIFEST
    if not path.exists():
        return None
    try:
        items = json.loads(path.read_text())
        return [FigureInfo(**{**i, "png": Path(i["png"]) if i.get("png") else None,
                              "svg": Path(i["svg"]) if i.get("svg") else None}) for i in items]
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s: unreadable figure manifest (%s): figures will be redrawn", path, exc)
        return None


def main(argv: list[str] | None = None) -> int:
    """``llmenergy plot [--results DIR]``: figures from ``DIR/summary.parquet`` into ``DIR/figures``."""
    ap = argparse.ArgumentParser(prog="llmenergy plot", description="Draw the figures.")
    ap.add_argument("--results", type=Path, default=Path("results"))
    args = ap.parse_args(argv)
    path = args.results / "summary.parquet"
    if not path.exists():
        raise UserError(f"{path}: no summary; run `llmenergy aggregate` first")
    infos = make_figures(pd.read_parquet(path), args.results / "figures")
    log.info("%d figure(s) drawn, %d skipped", sum(not i.skipped for i in infos),
             sum(i.skipped for i in infos))
    return 0
