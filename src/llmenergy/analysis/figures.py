"""The figure set: the engine comparison, the paper's figures, then the prefill/decode
split, active energy, the power-cap trade-off and a J/token–latency Pareto front.

Each builder takes the per-repeat summary and returns ``(Figure, caption)`` or
raises :class:`FigureSkipped` with the reason. Line figures give every axis that
varies its own line or panel (see :func:`llmenergy.analysis.figdata.layout`);
:data:`FAMILIES` groups them so that each ok cell appears in every metric family.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from llmenergy.analysis.figdata import (
    CI_TEXT,
    CONFIG_KEYS,
    AXIS_NAMES,
    FigureSkipped,
    attach,
    below_resolution,
    energy_rows,
    fmt_value,
    layout,
    matched,
    n_text,
    null_reason,
    ok_rows,
    power_label,
    sorted_values,
    thin_hues,
)
from llmenergy.analysis.figdraw import (
    DODGE_TEXT,
    PALETTE,
    LineSpec,
    draw_lines,
    hollow_handle,
    hue_legend,
    line_figure,
    new_figure,
    set_x_ticks,
    set_y_scale,
)
from llmenergy.analysis.figpareto import fig_pareto

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
                    title=f"{ylabel.replace(' (', ', ').rstrip(')')} vs {AXIS_NAMES[x]}", **kw)  # type: ignore[arg-type]

    def build(summary: pd.DataFrame) -> tuple[Figure, str]:
        pick = energy_rows if energy else ok_rows
        df = pick(summary, y, x)
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


PREFILL_UNRESOLVED = ("prefill windows shorter than 10 sensor update periods: not resolved; "
                      "see docs/measurement.md")


def fig_prefill_decode(summary: pd.DataFrame) -> tuple[Figure, str]:
    """Decode energy per token wherever it is published; prefill beside it where it is,
    and the caption says why it is left out (below the sensor's resolution, as a rule)."""
    df = energy_rows(summary, "decode_energy_j", "tokens_out", "batch_size")
    df = df[df["tokens_out"] > 0]
    if "prefill_energy_j" not in df.columns:
        df = df.assign(prefill_energy_j=np.nan)
    n_missing = int(df["prefill_energy_j"].isna().sum())
    long = _melted(df, {"prefill_energy_j": "prefill", "decode_energy_j": "decode"},
                   "tokens_out", "phase")
    what = ("Energy of the decode phase per output token," if n_missing == len(df) else
            "Energy of the prefill and of the decode phase, each per output token,")
    spec = LineSpec(y="_value", ylabel="Energy per output token (J/token)", x="batch_size",
                    hue="phase", hue_label="phase", title="Prefill vs decode energy per token",
                    what=what)
    fig, caption = line_figure(long, spec)
    if n_missing:
        why = (PREFILL_UNRESOLVED if below_resolution(summary, "prefill_energy_j")
               else f"prefill energy null: {null_reason(summary, 'prefill_energy_j') or 'not measured'}")
        scope = ("Prefill is not drawn" if n_missing == len(df)
                 else f"Prefill is left out for {n_missing} of {len(df)} repeat(s)")
        caption = f"{scope}: {why}. {caption}"
        if n_missing == len(df):
            fig.suptitle("Decode energy per token (prefill not resolved by the sensor; "
                         f"{power_label(df)})" if below_resolution(summary, "prefill_energy_j")
                         else f"Decode energy per token ({power_label(df)})")
    return fig, caption


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
    """Energy and time per output token at each cap, relative to the uncapped cell (else the
    highest cap). Per token: a repeat runs whole cycles of its batches until it lasts
    ``collector.min_window_s``, so a capped repeat can run fewer tokens than the baseline's."""
    df = energy_rows(summary, "energy_j", "duration_s", "tokens_out")
    df = df[df["tokens_out"] > 0]
    if "power_cap_w" not in df.columns:
        raise FigureSkipped("summary has no power_cap_w column")
    cfg = [k for k in CONFIG_KEYS if k in df.columns]
    n_caps = df.assign(_c=df["power_cap_w"].fillna(-1.0)).groupby(cfg, dropna=False)["_c"]
    df = df[n_caps.transform("nunique") >= 2]
    if len(df) == 0:
        raise FigureSkipped("no configuration was run at two or more power caps")
    lay = layout(df, "power_cap_w", "batch_size", hue_fixed=True)
    rows = lay.rows
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
        e_tok, t_tok = grp["energy_j"] / grp["tokens_out"], grp["duration_s"] / grp["tokens_out"]
        e0, t0 = e_tok[base.index].mean(), t_tok[base.index].mean()
        parts.append(grp.assign(energy=e_tok / e0, time=t_tok / t0))
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
    lay.rows = long
    groups = lay.panels()
    fig, axes = new_figure(len(groups), ncols=lay.ncols(len(groups)), sharey=True)
    counts: list[int] = []
    n_hollow = 0
    for ax, (key, grp) in zip(axes, groups, strict=True):
        data = grp.assign(_hue=grp["batch_size"].map(labels))
        n_hollow += draw_lines(ax, data, "_x", "_rel", "_hue", colours, dashes, style="quantity")
        counts += data.groupby(["_hue", "quantity", "_x"])["_rel"].count().tolist()
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(order)), [fmt_value("power_cap_w", c).replace(" (uncapped)", "")
                                          for c in order])
        ax.set(title=lay.panel_title(key), xlabel="Power cap per GPU",
               ylabel="Relative to the baseline cell")
    extra = [Line2D([], [], color="black", linestyle=s, label=q) for q, s in dashes.items()]
    hue_legend(fig, colours, "Batch size; per output token: energy / time",
               extra + ([hollow_handle()] if n_hollow else []))
    fig.suptitle(f"Power cap: energy and time per token relative to the baseline ({power_label(rows)})")
    attach(fig, long)
    panels = " × ".join(AXIS_NAMES.get(a, a) for a in lay.panel_axes) or "all data"
    caption = (f"Energy (solid) and time (dashed) per output token of a repeat at each power cap "
               f"(a repeat runs whole cycles until it lasts collector.min_window_s, so repeats "
               f"differ in tokens), divided by the "
               f"mean of the baseline cell of the same configuration (baseline: "
               f"{', '.join(sorted(baselines))}); one line per batch size, one panel per "
               f"{panels}. {lay.caption()} Bars: {CI_TEXT}, of the capped cell's repeats over "
               f"the baseline mean (the baseline's own spread is not propagated), "
               f"{n_text(counts)}.")
    return fig, caption


def fig_engine(summary: pd.DataFrame) -> tuple[Figure, str]:
    """J/token (top row) and tokens/s (bottom row) per engine against batch size."""
    df = energy_rows(summary, "j_per_token", "tokens_per_s", "batch_size")
    if "engine" not in df.columns or df["engine"].nunique() < 2:
        shown = ", ".join(sorted(map(str, df.get("engine", pd.Series(dtype=str)).dropna().unique())))
        raise FigureSkipped(f"only one engine in the data ({shown or 'none'}): nothing to compare")
    df, left_out = matched(df, "engine")
    lay = layout(df, "batch_size", "engine", hue_fixed=True)
    panels = lay.panels()
    engines = [e for e in sorted_values(lay.rows["engine"]) if isinstance(e, str)]
    pal = sns.color_palette(PALETTE, len(engines))
    colours = {str(e): tuple(pal[i]) for i, e in enumerate(engines)}
    ncols = lay.ncols(len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = new_figure(2 * nrows * ncols, ncols=ncols)
    counts: list[int] = []
    n_hollow = 0
    metrics = [("j_per_token", "Energy per output token (J/token)"),
               ("tokens_per_s", "Throughput (output tokens/s)")]
    for m, (y, ylabel) in enumerate(metrics):
        for p, (key, grp) in enumerate(panels):
            ax = axes[(2 * (p // ncols) + m) * ncols + p % ncols]
            data = grp.assign(_hue=grp["engine"].astype(str))
            n_hollow += draw_lines(ax, data, "batch_size", y, "_hue", colours, dodge=True)
            set_x_ticks(ax, data["batch_size"].unique())
            set_y_scale(ax, data.groupby(["_hue", "batch_size"])[y].mean().to_numpy())
            counts += data.groupby(["_hue", "batch_size"])[y].count().tolist()
            ax.set_title(lay.panel_title(key), fontsize="medium")
            ax.set(xlabel="Batch size", ylabel=ylabel)
    for ax in axes:
        if not ax.has_data():
            ax.set_axis_off()
    hue_legend(fig, colours, "Engine", [hollow_handle()] if n_hollow else [])
    fig.suptitle(f"Engines compared: energy per token and throughput ({power_label(lay.rows)})")
    attach(fig, lay.rows)
    panel_text = " × ".join(AXIS_NAMES.get(a, a) for a in lay.panel_axes)
    panel_text = f", one panel per {panel_text}" if panel_text else ""
    return fig, (f"Energy per output token (upper row) and output tokens per second (lower row) "
                 f"against batch size, one line per engine{panel_text}. "
                 f"{lay.caption()} Points: mean over the ok repeats of one cell; bars: {CI_TEXT}, "
                 f"{n_text(counts)}. {DODGE_TEXT} {left_out + ' ' if left_out else ''}"
                 "The ratios with their intervals are in the Comparisons table.")


#: The metric families: every ok cell with the metric is drawn in at least one figure of each.
FAMILIES = {
    "throughput": ["tokens_per_s_vs_batch", "tokens_per_s_vs_shards", "words_per_s_vs_batch",
                   "words_per_s_vs_shards", "responses_per_s_vs_batch", "responses_per_s_vs_shards"],
    "J/token": ["j_per_token_vs_batch", "j_per_token_vs_shards", "j_per_token_vs_max_gen_len"],
    "J/word": ["j_per_word_vs_batch", "j_per_word_vs_shards", "j_per_word_vs_max_gen_len"],
    "J/response": ["j_per_response_vs_batch", "j_per_response_vs_shards",
                   "j_per_response_vs_max_gen_len"],
    "power": ["energy_per_second_vs_batch", "energy_per_second_vs_shards"],
}


def _registry() -> dict[str, Builder]:
    out: dict[str, Builder] = {"engine_comparison": fig_engine}
    # the _vs_batch figure of a family keeps one-point panels: it shows every cell
    for y, (label, what) in THROUGHPUT.items():
        for x in ("batch_size", "shards"):
            out[f"{y}_vs_{SHORT[x]}"] = _line_builder(y, x, label, what, energy=False,
                                                       keep_single=x == "batch_size")
    for x in ("batch_size", "shards"):
        out[f"energy_per_second_vs_{SHORT[x]}"] = _line_builder(
            "avg_power_w", x, "Energy per second (J/s = W, all GPUs)",
            "Average power of all the cell's GPUs during prefill and decode", energy=True,
            keep_single=x == "batch_size")
    for y, (label, what) in ENERGY_PER.items():
        for x in ("batch_size", "shards", "max_gen_len"):
            out[f"{y}_vs_{SHORT[x]}"] = _line_builder(y, x, label, what, energy=True,
                                                       keep_single=x == "batch_size")
    out["j_per_token_by_dataset"] = _line_builder(
        "j_per_token", "batch_size", "Energy per output token (J/token)",
        "Energy per output token, Alpaca against GSM8K,", energy=True, hue="dataset", min_hues=2,
        keep_single=True)
    out["gpu_type_comparison"] = _line_builder(
        "j_per_token", "batch_size", "Energy per output token (J/token)",
        "Energy per output token, GPU type against GPU type,", energy=True, hue="gpu",
        facets=("model",), min_hues=2, keep_single=True)
    out["power_cap_tradeoff"] = fig_power_cap
    out["prefill_vs_decode_energy"] = fig_prefill_decode
    out["active_vs_total_energy"] = fig_active_energy
    out["pareto_j_per_token_latency"] = fig_pareto
    return out


BUILDERS: dict[str, Builder] = _registry()
