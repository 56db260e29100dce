"""The figure set: the paper's figures, then the prefill/decode split, active energy,
the power-cap trade-off and a J/token–latency Pareto front.

Each builder takes the per-repeat summary and returns ``(Figure, caption)`` or
raises :class:`FigureSkipped` with the reason. Line figures hold every axis they
do not plot fixed (see :mod:`llmenergy.analysis.figdata`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from llmenergy.analysis.figdata import (
    AXIS_NAMES,
    CI_TEXT,
    CONFIG_KEYS,
    FigureSkipped,
    energy_rows,
    fmt_number,
    fmt_value,
    hold_fixed,
    n_text,
    ok_rows,
    power_label,
    thin_hues,
)
from llmenergy.analysis.figdraw import (
    PALETTE,
    LineSpec,
    draw_lines,
    facet_title,
    hue_legend,
    line_figure,
    new_figure,
    set_y_scale,
)

log = logging.getLogger(__name__)

Builder = Callable[[pd.DataFrame], tuple[Figure, str]]

THROUGHPUT = {
    "tokens_per_s": ("Throughput (output tokens/s)", "Output tokens per second"),
    "words_per_s": ("Throughput (words/s)", "Words of the responses per second"),
    "responses_per_s": ("Throughput (responses/s)", "Responses per second"),
}
ENERGY_PER = {
    "j_per_token": ("Energy per output token (J/token)", "Energy per output token"),
    "j_per_word": ("Energy per word (J/word)", "Energy per word of the responses"),
    "j_per_response": ("Energy per response (J/response)", "Energy per response"),
}
OTHER_AXIS = {"batch_size": "shards", "shards": "batch_size", "max_gen_len": "batch_size"}
SHORT = {"batch_size": "batch", "shards": "shards", "max_gen_len": "max_gen_len"}


def _line_builder(y: str, x: str, ylabel: str, what: str, *, energy: bool,
                  hue: str | None = None, **kw: object) -> Builder:
    hue = hue or OTHER_AXIS[x]
    spec = LineSpec(y=y, ylabel=ylabel, x=x, hue=hue, what=what,
                    title=f"{ylabel.split(' (')[0]} vs {AXIS_NAMES[x]}", **kw)  # type: ignore[arg-type]

    def build(summary: pd.DataFrame) -> tuple[Figure, str]:
        pick = energy_rows if energy else ok_rows
        df = pick(summary, y, x, hue)
        if len(df) == 0:
            raise FigureSkipped(f"no successful cell with {y}")
        return line_figure(df, spec)

    build.__name__ = f"fig_{y}_vs_{x}"
    return build


def _melted(df: pd.DataFrame, columns: dict[str, str], per: str, name: str) -> pd.DataFrame:
    """Long form: one row per repeat and column of ``columns`` (value / ``per``) in ``name``."""
    parts = []
    for col, label in columns.items():
        sub = df.dropna(subset=[col, per])
        parts.append(sub.assign(**{name: label, "_value": sub[col] / sub[per]}))
    return pd.concat(parts, ignore_index=True)


def fig_prefill_decode(summary: pd.DataFrame) -> tuple[Figure, str]:
    df = energy_rows(summary, "prefill_energy_j", "decode_energy_j", "tokens_out", "batch_size")
    df = df[df["tokens_out"] > 0]
    long = _melted(df, {"prefill_energy_j": "prefill", "decode_energy_j": "decode"},
                   "tokens_out", "phase")
    spec = LineSpec(y="_value", ylabel="Energy per output token (J/token)", x="batch_size",
                    hue="phase", hue_label="phase", title="Prefill vs decode energy per token",
                    what="Energy of the prefill and of the decode phase, each per output token,")
    return line_figure(long, spec)


def fig_active_energy(summary: pd.DataFrame) -> tuple[Figure, str]:
    df = energy_rows(summary, "energy_j", "active_energy_j", "tokens_out", "batch_size")
    df = df[df["tokens_out"] > 0]
    long = _melted(df, {"energy_j": "total", "active_energy_j": "active (idle subtracted)"},
                   "tokens_out", "energy")
    spec = LineSpec(y="_value", ylabel="Energy per output token (J/token)", x="batch_size",
                    hue="energy", hue_label="energy", title="Total vs active energy per token",
                    what=("Total energy and active energy (total minus the cell's idle power × "
                          "time), each per output token,"))
    return line_figure(long, spec)


def fig_power_cap(summary: pd.DataFrame) -> tuple[Figure, str]:
    """Energy and time at each cap, relative to the uncapped cell (else the highest cap)."""
    df = energy_rows(summary, "energy_j", "duration_s")
    if "power_cap_w" not in df.columns:
        raise FigureSkipped("summary has no power_cap_w column")
    cfg = [k for k in CONFIG_KEYS if k in df.columns]
    n_caps = df.assign(_c=df["power_cap_w"].fillna(-1.0)).groupby(cfg, dropna=False)["_c"]
    df = df[n_caps.transform("nunique") >= 2]
    if len(df) == 0:
        raise FigureSkipped("no configuration was run at two or more power caps")
    held = hold_fixed(df, ("model", "gpu"), "power_cap_w", "batch_size")
    rows = held.rows
    batches = thin_hues(sorted(rows["batch_size"].unique().tolist()), 4)
    rows = rows[rows["batch_size"].isin(batches)]
    parts, baselines = [], set()
    for _, grp in rows.groupby(cfg, dropna=False):
        base = grp[grp["power_cap_w"].isna()]
        if len(base) == 0:
            top = grp["power_cap_w"].max()
            base = grp[grp["power_cap_w"] == top]
            baselines.add(fmt_value("power_cap_w", top))
        else:
            baselines.add("uncapped")
        e0, t0 = base["energy_j"].mean(), base["duration_s"].mean()
        parts.append(grp.assign(energy=grp["energy_j"] / e0, time=grp["duration_s"] / t0))
    rel = pd.concat(parts)
    caps = sorted(rel["power_cap_w"].dropna().unique().tolist(), reverse=True)
    order = ([np.nan] if rel["power_cap_w"].isna().any() else []) + caps
    pos = {fmt_value("power_cap_w", c): i for i, c in enumerate(order)}
    rel = rel.assign(_x=rel["power_cap_w"].map(lambda c: pos[fmt_value("power_cap_w", c)]))
    long = pd.concat([rel.assign(quantity=q, _rel=rel[q]) for q in ("energy", "time")])
    labels = {b: f"batch {fmt_value('batch_size', b)}" for b in batches}
    pal = sns.color_palette(PALETTE, len(batches))
    colours = {labels[b]: tuple(pal[i]) for i, b in enumerate(batches)}
    dashes = {"energy": "-", "time": "--"}
    groups = [(k if isinstance(k, tuple) else (k,), g) for k, g in long.groupby(["model", "gpu"])]
    fig, axes = new_figure(len(groups), ncols=max(1, min(long["gpu"].nunique(), len(groups), 3)),
                           sharey=True)
    counts: list[int] = []
    for ax, (key, grp) in zip(axes, groups, strict=True):
        data = grp.assign(_hue=grp["batch_size"].map(labels))
        draw_lines(ax, data, "_x", "_rel", "_hue", colours, dashes, style="quantity")
        counts += data.groupby(["_hue", "quantity", "_x"])["_rel"].count().tolist()
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(order)), [fmt_value("power_cap_w", c).replace(" (uncapped)", "")
                                          for c in order])
        ax.set(title=facet_title(held, key), xlabel="Power cap per GPU",
               ylabel="Relative to the baseline cell")
    extra = [Line2D([], [], color="black", linestyle=s, label=q) for q, s in dashes.items()]
    hue_legend(fig, colours, "Batch size; energy / time", extra)
    fig.suptitle(f"Power cap: energy and time relative to the baseline ({power_label(rows)})")
    caption = (f"Energy (solid) and time (dashed) of a repeat at each power cap, divided by the "
               f"mean of the baseline cell of the same configuration (baseline: "
               f"{', '.join(sorted(baselines))}); one line per batch size, one panel per model × "
               f"GPU type. {held.caption()} Bars: {CI_TEXT}, of the capped cell's repeats over "
               f"the baseline mean (the baseline's own spread is not propagated), "
               f"{n_text(counts)}.")
    return fig, caption


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


def config_label(row: pd.Series) -> str:
    cap = "" if pd.isna(row.get("power_cap_w")) else f" {fmt_value('power_cap_w', row['power_cap_w'])}"
    return (f"{row['gpu']} s{fmt_value('shards', row['shards'])} "
            f"b{fmt_value('batch_size', row['batch_size'])} g{fmt_value('max_gen_len', row['max_gen_len'])}"
            f" {row['dataset']}{cap}")


def fig_pareto(summary: pd.DataFrame) -> tuple[Figure, str]:
    df = energy_rows(summary, "j_per_token", "latency_p50_s")
    cfg = [k for k in CONFIG_KEYS + ["power_cap_w"] if k in df.columns]
    pts = df.groupby(cfg, dropna=False)[["latency_p50_s", "j_per_token"]].mean().reset_index()
    models = sorted(pts["model"].astype(str).unique())
    gpus = sorted(pts["gpu"].astype(str).unique())
    pal = dict(zip(gpus, sns.color_palette(PALETTE, len(gpus)), strict=True))
    fig, axes = new_figure(len(models), ncols=min(len(models), 3), width=4.6, height=3.8)
    n_front = 0
    for ax, model in zip(axes, models, strict=True):
        grp = pts[pts["model"] == model].reset_index(drop=True)
        for gpu, sub in grp.groupby("gpu"):
            ax.scatter(sub["latency_p50_s"], sub["j_per_token"], color=pal[str(gpu)], alpha=0.6,
                       s=18, label=str(gpu))
        x, y = grp["latency_p50_s"].to_numpy(float), grp["j_per_token"].to_numpy(float)
        front = pareto_front(x, y)
        n_front += len(front)
        ax.step(x[front], y[front], where="post", color="black", linewidth=1, label="Pareto front")
        for k, i in enumerate(front):
            ax.annotate(config_label(grp.loc[i]), (x[i], y[i]), fontsize="x-small",
                        textcoords="offset points", xytext=(6, 8 if k % 2 else -10))
        set_y_scale(ax, y)
        if len(x) and x.min() > 0 and x.max() / x.min() > 10:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_number(v)))
        ax.set(title=str(model), xlabel="Median batch latency, prefill + decode (s)",
               ylabel="Energy per output token (J/token)")
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=g) for g, c in pal.items()]
    handles.append(Line2D([], [], color="black", label="Pareto front"))
    fig.legend(handles=handles, title="GPU type", loc="outside right center", fontsize="small")
    fig.suptitle(f"Energy vs latency, Pareto front per model ({power_label(df)})")
    return fig, (f"Each point is one cell (one configuration, every axis fixed; mean over its ok "
                 f"repeats, no bars); {n_front} of {len(pts)} are on the front of their model "
                 "(lower is better on both axes) and are labelled GPU, shards (s), batch (b), "
                 "max generation length (g), dataset and power cap.")


def _registry() -> dict[str, Builder]:
    out: dict[str, Builder] = {}
    for y, (label, what) in THROUGHPUT.items():
        for x in ("batch_size", "shards"):
            out[f"{y}_vs_{SHORT[x]}"] = _line_builder(y, x, label, what, energy=False)
    out["energy_per_second_vs_shards"] = _line_builder(
        "avg_power_w", "shards", "Energy per second (J/s = W, all GPUs)",
        "Average power of all the cell's GPUs during prefill and decode", energy=True)
    for y, (label, what) in ENERGY_PER.items():
        for x in ("batch_size", "shards", "max_gen_len"):
            out[f"{y}_vs_{SHORT[x]}"] = _line_builder(y, x, label, what, energy=True)
    out["j_per_token_by_dataset"] = _line_builder(
        "j_per_token", "batch_size", "Energy per output token (J/token)",
        "Energy per output token, Alpaca against GSM8K,", energy=True, hue="dataset", min_hues=2)
    out["gpu_type_comparison"] = _line_builder(
        "j_per_token", "batch_size", "Energy per output token (J/token)",
        "Energy per output token, GPU type against GPU type,", energy=True, hue="gpu",
        facets=("model",), min_hues=2)
    out["power_cap_tradeoff"] = fig_power_cap
    out["prefill_vs_decode_energy"] = fig_prefill_decode
    out["active_vs_total_energy"] = fig_active_energy
    out["pareto_j_per_token_latency"] = fig_pareto
    return out


BUILDERS: dict[str, Builder] = _registry()
