"""The J/token–latency Pareto figure: a point per cell, the front of each model numbered.

Front points carry a number, not a long label; the numbers are placed so that no
two overlap (each tries a ring of offsets around its point and takes the first
that clears every label already placed), and the report prints the key (number →
configuration) as a table under the figure (:attr:`FigureData.table`).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Annotation
from matplotlib.ticker import FuncFormatter, NullFormatter

from llmenergy.analysis.figdata import (
    CONFIG_KEYS,
    FigureData,
    energy_rows,
    fmt_number,
    fmt_value,
    power_label,
)
from llmenergy.analysis.figdraw import PALETTE, hollow_handle, new_figure, set_y_scale

log = logging.getLogger(__name__)

#: Offsets (points) tried around a front point, nearest first.
OFFSETS = [(5, 4), (5, -12), (-13, 4), (-13, -12), (5, 14), (-13, 14), (5, -22), (-13, -22),
           (14, -4), (-22, -4), (15, 20), (-24, 20), (15, -28), (-24, -28), (24, 6), (-32, 6)]


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
    """``H100 s1 b16 g256 alpaca reference 250 W`` (cap only when set)."""
    cap = "" if pd.isna(row.get("power_cap_w")) else f" {fmt_value('power_cap_w', row['power_cap_w'])}"
    engine = f" {row['engine']}" if "engine" in row.index and pd.notna(row["engine"]) else ""
    return (f"{row['gpu']} s{fmt_value('shards', row['shards'])} "
            f"b{fmt_value('batch_size', row['batch_size'])} g{fmt_value('max_gen_len', row['max_gen_len'])}"
            f" {row['dataset']}{engine}{cap}")


def place_labels(fig: Figure, items: list[tuple[Axes, float, float, str]]) -> list[Annotation]:
    """Annotate each (axes, x, y, text) at the first offset whose box clears the others."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()  # runs the layout, so the boxes below are final
    renderer = canvas.get_renderer()
    placed: list[Any] = []
    out = []
    for ax, x, y, text in items:
        ann = None
        for dx, dy in OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy),
                              fontsize="small", fontweight="bold")
            box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(o) for o in placed):
                placed.append(box)
                break
            ann.remove()
            ann = None
        if ann is None:  # crowded: stack it beside the axes' top right corner instead
            k = sum(1 for a in out if a.axes is ax and a.xycoords == "axes fraction")
            ann = ax.annotate(text, (1.0, 1.0 - 0.07 * k), xycoords="axes fraction",
                              fontsize="small", fontweight="bold", ha="right", va="top")
            placed.append(ann.get_window_extent(renderer))
        out.append(ann)
    fig.set_layout_engine("none")  # keep the geometry the boxes were measured in
    return out


def fig_pareto(summary: pd.DataFrame) -> tuple[Figure, str]:
    df = energy_rows(summary, "j_per_token", "latency_p50_s")
    cfg = [k for k in CONFIG_KEYS + ["power_cap_w"] if k in df.columns]
    pts = (df.groupby(cfg, dropna=False)
           .agg(latency_p50_s=("latency_p50_s", "mean"), j_per_token=("j_per_token", "mean"),
                _flagged=("_flagged", "any"), cell_id=("cell_id", "first"))
           .reset_index())
    models = sorted(pts["model"].astype(str).unique())
    gpus = sorted(pts["gpu"].astype(str).unique())
    pal = dict(zip(gpus, sns.color_palette(PALETTE, len(gpus)), strict=True))
    fig, axes = new_figure(len(models), ncols=min(len(models), 3), width=4.6, height=3.8)
    items: list[tuple[Axes, float, float, str]] = []
    table: list[dict[str, Any]] = []
    for ax, model in zip(axes, models, strict=True):
        grp = pts[pts["model"] == model].reset_index(drop=True)
        for gpu, sub in grp.groupby("gpu"):
            face = [("white" if f else pal[str(gpu)]) for f in sub["_flagged"]]
            ax.scatter(sub["latency_p50_s"], sub["j_per_token"], facecolors=face,
                       edgecolors=pal[str(gpu)], alpha=0.8, s=22, label=str(gpu))
        x, y = grp["latency_p50_s"].to_numpy(float), grp["j_per_token"].to_numpy(float)
        front = pareto_front(x, y)
        ax.step(x[front], y[front], where="post", color="black", linewidth=1, label="Pareto front")
        for i in front:
            row = grp.loc[i]
            number = len(table) + 1
            items.append((ax, x[i], y[i], str(number)))
            table.append({"#": number, "model": model, "configuration": config_label(row),
                          "latency_p50_s": float(x[i]), "j_per_token": float(y[i]),
                          "cell_id": str(row["cell_id"]),
                          "flagged": "yes" if row["_flagged"] else ""})
        set_y_scale(ax, y)
        if len(x) and x.min() > 0 and x.max() / x.min() > 10:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_number(v)))
        ax.set(title=str(model), xlabel="Median batch latency, prefill + decode (s)",
               ylabel="Energy per output token (J/token)")
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=g) for g, c in pal.items()]
    handles.append(Line2D([], [], color="black", label="Pareto front"))
    if pts["_flagged"].any():
        handles.append(hollow_handle())
    fig.legend(handles=handles, title="GPU type", loc="outside right center", fontsize="small")
    fig.suptitle(f"Energy vs latency, Pareto front per model ({power_label(df)})")
    place_labels(fig, items)
    fig.llmenergy_data = FigureData(sorted(map(str, df["cell_id"].unique())),
                                    sorted(map(str, df.loc[df["_flagged"], "cell_id"].unique())),
                                    table)
    return fig, (f"Each point is one cell (one configuration, every axis fixed; mean over its ok "
                 f"repeats, no bars); {len(table)} of {len(pts)} are on the front of their model "
                 "(lower is better on both axes) and are numbered; the table under the figure "
                 "gives each number's configuration: GPU, shards (s), batch (b), max generation "
                 "length (g), dataset, engine and power cap.")
