"""Report plots.  Each function takes the results DataFrame (or a table derived from it) and
returns a matplotlib Figure, or None when the data for it does not exist.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot): no global state, no
GUI backend; ``savefig`` renders through Agg.
"""

from __future__ import annotations

import math
import textwrap

import matplotlib
import matplotlib.ticker as ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from opbench.reports import tables
from opbench.reports.frame import (
    column,
    dtype_sort_key,
    error_metrics,
    numeric,
    of_kind,
    with_perf,
)

STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "figure.titlesize": 13,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
PANEL_SIZE = (5.0, 3.6)


def _panels(count: int, title: str) -> tuple[Figure, list]:
    """A figure with ``count`` panels, at most 3 per row."""
    ncols = min(count, 3)
    nrows = math.ceil(count / ncols)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.6),
                     layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for extra in axes[count:]:
        extra.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:count]


def _figure_legend(fig: Figure, axes: list, title: str) -> None:
    """One legend for all panels, outside them, so it never hides a point or a threshold."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), title=title, loc="outside right upper")


def _colors(names) -> dict:
    palette = matplotlib.colormaps["tab10"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(set(names)))}


def throughput_vs_size(df: pd.DataFrame) -> Figure | None:
    """GB/s (or GFLOP/s for compute-bound ops) against bytes per call, one panel per op;
    markers only: neighbouring sizes are often unrelated cases (dtypes, layouts, runs)."""
    perf = with_perf(of_kind(df, "perf"))
    perf = perf.assign(
        _bytes=numeric(perf, "perf.bytes"),
        _gbps=numeric(perf, "perf.gbps"),
        _gflops=numeric(perf, "perf.gflops"),
        _bound=column(perf, "perf.bound"),
    )
    perf = perf[perf["_bytes"] > 0]
    if perf.empty:
        return None
    ops = sorted(perf["op"].unique())
    colors = _colors(perf["backend"])
    fig, axes = _panels(len(ops), "Throughput vs size")
    for ax, op in zip(axes, ops):
        rows = perf[perf["op"] == op]
        compute = (rows["_bound"] == "compute").mean() > 0.5 and rows["_gflops"].notna().any()
        metric, unit = ("_gflops", "GFLOP/s") if compute else ("_gbps", "GB/s")
        for backend, group in rows.groupby("backend"):
            group = group.sort_values("_bytes")
            ax.plot(group["_bytes"] / 2**20, group[metric], "o", color=colors[backend], alpha=0.8,
                    label=backend)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        # a narrow size range has no decade inside it: matplotlib then labels minor ticks,
        # which overlap into an unreadable string
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(op)
        ax.set_xlabel("data moved per call (MiB, log scale)")
        ax.set_ylabel(f"throughput ({unit})")
    _figure_legend(fig, axes, "backend")
    return fig


def fraction_of_ceiling(df: pd.DataFrame) -> Figure | None:
    """Each perf case's throughput as a % of the machine ceiling bounding it, by op."""
    perf = with_perf(of_kind(df, "perf"))
    perf = perf.assign(_pct=numeric(perf, "perf.fraction_of_ceiling") * 100)
    perf = perf[perf["_pct"].notna()]
    if perf.empty:
        return None
    ops = sorted(perf["op"].unique())
    backends = sorted(perf["backend"].unique())
    colors = _colors(backends)
    fig, (ax,) = _panels(1, "Fraction of the calibrated ceiling (copy GB/s or GEMM GFLOP/s)")
    fig.set_size_inches(max(6.0, 1.4 * len(ops) + 3), 4.2)
    rng = np.random.default_rng(0)  # jitter only; seeded so reports are reproducible
    width = 0.6 / max(len(backends), 1)
    for b_index, backend in enumerate(backends):
        rows = perf[perf["backend"] == backend]
        x = rows["op"].map(ops.index) + (b_index - (len(backends) - 1) / 2) * width
        x = x + rng.uniform(-width / 3, width / 3, len(rows))
        ax.scatter(x, rows["_pct"], color=colors[backend], label=backend, alpha=0.8)
    ax.axhline(100, color="grey", linestyle="--", linewidth=1, label="ceiling")
    ax.set_xticks(range(len(ops)), ops)
    ax.set_xlim(-0.6, len(ops) - 0.4)
    ax.set_xlabel("op")
    ax.set_ylabel("% of the bounding ceiling")
    ax.set_ylim(bottom=0)
    ax.legend(title="backend")
    return fig


def error_vs_dtype(df: pd.DataFrame) -> Figure | None:
    """NMSE against the float64 oracle by storage dtype, one panel per op (log scale)."""
    tests = of_kind(df, "test")
    errors = error_metrics(tests)
    tests = tests.assign(_nmse=errors["value"].where(errors["metric"] == "nmse"),
                         _threshold=errors["threshold"],
                         _dtype=column(tests, "dtype").fillna("?").astype(str))
    tests = tests[np.isfinite(tests["_nmse"].astype(float))]
    if tests.empty:
        return None
    floor = 1e-20  # bit-exact results (NMSE 0) are drawn at the floor of the log axis
    ops = sorted(tests["op"].unique())
    colors = _colors(tests["backend"])
    fig, axes = _panels(len(ops), "Error vs dtype (NMSE against the float64 oracle)")
    for ax, op in zip(axes, ops):
        rows = tests[tests["op"] == op]
        dtypes = sorted(rows["_dtype"].unique(), key=dtype_sort_key)
        backends = sorted(rows["backend"].unique())
        for b_index, backend in enumerate(backends):
            group = rows[rows["backend"] == backend]
            x = group["_dtype"].map(dtypes.index) + 0.15 * (b_index - (len(backends) - 1) / 2)
            ax.scatter(x, group["_nmse"].clip(lower=floor), color=colors[backend],
                       label=backend, alpha=0.75)
        _threshold_marks(ax, rows, dtypes)
        ax.set_yscale("log")
        ax.set_xticks(range(len(dtypes)), dtypes)
        ax.set_title(op)
        ax.set_xlabel("storage dtype")
        ax.set_ylabel("NMSE (dimensionless, log)")
    _figure_legend(fig, axes, "backend")
    if (tests["_nmse"] < floor).any():
        fig.suptitle(f"{fig.get_suptitle()}; exact results (0) drawn at {floor:g}")
    return fig


def _threshold_marks(ax, rows: pd.DataFrame, dtypes: list[str]) -> None:
    thresholds = rows["_threshold"]
    if thresholds.notna().sum() == 0:
        return
    for i, dtype in enumerate(dtypes):
        value = thresholds[rows["_dtype"] == dtype].max()
        if pd.notna(value) and value > 0:
            ax.hlines(value, i - 0.35, i + 0.35, colors="red", linestyles=":",
                      label="threshold" if i == 0 else None)


def toggle_speedups(df: pd.DataFrame, names=("rope_cache", "graph_reuse")) -> Figure | None:
    """Speedup (time off / time on) of each cache toggle per configuration and backend."""
    found = {name: tables.speedups(df, name) for name in names}
    found = {name: t for name, t in found.items() if not t.empty}
    if not found:
        return None
    all_backends = pd.concat([t["backend"] for t in found.values()])
    colors = _colors(all_backends)
    rows_total = sum(t["config"].nunique() for t in found.values())
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(9.0, 1.6 + 0.38 * rows_total + 0.9 * len(found)),
                     layout="constrained")
        axes = fig.subplots(len(found), 1, squeeze=False).ravel()
    fig.suptitle("Speedup from caches (time off / time on; > 1: faster with it on)")
    for ax, (name, table) in zip(axes, found.items()):
        _speedup_bars(ax, table, colors)
        ax.set_title(f"{name}: on vs off")
    return fig


def _speedup_bars(ax, table: pd.DataFrame, colors: dict) -> None:
    configs = list(dict.fromkeys(table["config"]))
    backends = sorted(table["backend"].unique())
    height = 0.8 / len(backends)
    for b_index, backend in enumerate(backends):
        rows = table[table["backend"] == backend]
        y = rows["config"].map(configs.index) + (b_index - (len(backends) - 1) / 2) * height
        ax.barh(y, rows["speedup"], height=height, color=colors[backend], label=backend)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(configs)), configs)
    ax.invert_yaxis()
    ax.set_xlabel("speedup (×)")
    ax.set_ylabel("configuration")
    ax.legend(title="backend", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def device_scaling(df: pd.DataFrame) -> Figure | None:
    """Median scenario time against device count, one line per backend and split."""
    table = tables.device_scaling(df)
    if table.empty:
        return None
    fig, (ax,) = _panels(1, "Scaling with devices (scenario, best configuration)")
    fig.set_size_inches(7.0, 4.4)
    colors = _colors(table["split"])
    markers = dict(zip(sorted(table["backend"].unique()), "osD^v<>"))
    for (backend, split), group in table.groupby(["backend", "split"]):
        ax.plot(group["devices"], group["median_ms"], marker=markers[backend],
                color=colors[split], label=f"{backend} / {split}")
    ax.set_xticks(sorted(table["devices"].unique()))
    ax.set_xlabel("logical devices")
    ax.set_ylabel("median time per run (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(title="backend / split")
    return fig


def error_vs_world_size(df: pd.DataFrame) -> Figure | None:
    """Worst error over a scenario's steps against the device count, one line per sequence
    split: how ring attention's error grows with the world size."""
    table = tables.error_vs_world_size(df)
    if table.empty:
        return None
    fig, (ax,) = _panels(1, "Error against world size (worst step per scenario)")
    fig.set_size_inches(7.0, 4.4)
    colors = _colors(table["split"])
    for split, group in table.groupby("split"):
        # an exact 0 has no place on a log axis: drawn at the axis floor instead of dropped
        ax.plot(group["devices"], group["nmse"].clip(lower=1e-20), marker="o",
                color=colors[split], label=split)
    ax.set_yscale("log")
    ax.set_xticks(sorted(table["devices"].unique()))
    ax.set_xlabel("logical devices (world size)")
    ax.set_ylabel("worst NMSE against the oracle")
    ax.legend(title="split")
    return fig


#: (file stem, title, builder, what is needed) in report order
PLOTS = (
    ("throughput_vs_size", "Throughput vs size", throughput_vs_size,
     "perf records with bytes per call"),
    ("fraction_of_ceiling", "Fraction of ceiling", fraction_of_ceiling,
     "perf records with calibrated ceilings (run `opbench calibrate`) that ran from memory,"
     " not cache-resident"),
    ("error_vs_dtype", "Error vs dtype", error_vs_dtype, "test records with an NMSE metric"),
    ("toggle_speedups", "Speedup of rope_cache and graph_reuse", toggle_speedups,
     "timed scenario records with rope_cache or graph_reuse both on and off"),
    ("device_scaling", "Scaling with devices per split", device_scaling,
     "timed scenario records with a device count"),
    ("error_vs_world_size", "Error against world size", error_vs_world_size,
     "ring/zigzag/stripe scenario records at two or more device counts "
     "(`opbench scenario --sweep devices=1..8`)"),
)


HISTORY_PANELS = 9


def history_figure(table: pd.DataFrame, steps: pd.DataFrame,
                   panels: int = HISTORY_PANELS) -> Figure:
    """Median time per commit for up to ``panels`` cases (those with a step first), the steps
    marked by a dashed line at the first commit of the new level."""
    from opbench.reports.history import SERIES as CASE

    timed = table[table["median_ns"].notna()]
    stepped = set(map(tuple, steps[CASE].itertuples(index=False))) if not steps.empty else set()
    cases = sorted(timed.groupby(CASE, dropna=False).groups, key=lambda k: (k not in stepped, k))
    cases = cases[:panels] or [None]
    commits = list(table.sort_values("position").drop_duplicates("commit_label")["commit_label"])
    fig, axes = _panels(len(cases), "Median time per commit (dashed: a step)")
    for ax, key in zip(axes, cases):
        if key is None:
            ax.set_title("no timed records")
            continue
        rows = timed[(timed[CASE] == pd.Series(key, index=CASE)).all(axis=1)]
        x = rows["commit_label"].map(commits.index)
        ax.plot(x, rows["median_ns"] / 1e3, "o", color="tab:blue")
        for step in steps.itertuples(index=False) if key in stepped else ():
            if tuple(getattr(step, c) for c in CASE) == key:
                ax.axvline(commits.index(step.commit) - 0.5, color="tab:red", linestyle="--")
        ax.set_xticks(range(len(commits)), commits, rotation=45, ha="right", fontsize=8)
        method = f" ({key[5]})" if key[5] else ""
        title = textwrap.wrap(f"{key[1]} {key[4]}{method}", 56, break_long_words=True)
        ax.set_title("\n".join(title[:3]), fontsize=8)
        ax.set_ylabel("median time (µs)")
        ax.set_ylim(bottom=0)
    return fig
