"""Results DataFrame -> the report's tables (plain DataFrames; rendering is elsewhere)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from opbench.harness.records import FAILING, PASSING
from opbench.reports.frame import (
    column,
    devices_of,
    dtype_sort_key,
    error_metrics,
    numeric,
    of_kind,
    split_of,
    toggle,
    with_perf,
)


def _cell(statuses: pd.Series) -> str:
    """'12/12', '10/12 (2 failed)', '3/3 (1 xfail)' or 'unsupported' for one matrix cell."""
    ran = statuses[statuses != "UNSUPPORTED"]
    if ran.empty:
        return "unsupported"
    passed = int(ran.isin(PASSING).sum())
    failed = int(ran.isin(FAILING).sum())
    xfail = int((ran == "XFAIL").sum())
    notes = [f"{failed} failed" if failed else "", f"{xfail} xfail" if xfail else ""]
    note = ", ".join(n for n in notes if n)
    return f"{passed}/{len(ran)}" + (f" ({note})" if note else "")


def pass_fail_matrix(df: pd.DataFrame) -> pd.DataFrame:
    """Rows op, columns 'backend dtype', cells passed/run for the test records."""
    tests = of_kind(df, "test")
    if tests.empty:
        return pd.DataFrame()
    tests = tests.assign(dtype=column(tests, "dtype").fillna("").astype(str))
    cells = tests.groupby(["op", "backend", "dtype"])["status"].apply(_cell)
    matrix = cells.unstack(["backend", "dtype"]).fillna("")
    ordered = sorted(matrix.columns, key=lambda c: (c[0], dtype_sort_key(c[1])))
    matrix = matrix[ordered]
    matrix.columns = [f"{b} {d}".strip() for b, d in ordered]
    return matrix.reset_index()


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Per kind and backend, how many records had each status."""
    if df.empty:
        return pd.DataFrame()
    counts = df.groupby(["kind", "backend"])["status"].value_counts().unstack(fill_value=0)
    return counts.reset_index()


def worst_errors(df: pd.DataFrame, per_op: int = 5) -> pd.DataFrame:
    """The ``per_op`` test records with the largest error relative to its threshold, per op
    (each record judged by its worst output)."""
    tests = of_kind(df, "test")
    if tests.empty:
        return pd.DataFrame()
    errors = error_metrics(tests)
    table = pd.DataFrame(
        {
            "op": tests["op"],
            "backend": tests["backend"],
            "dtype": column(tests, "dtype"),
            "case": tests["case_id"],
            "status": tests["status"],
            "output": errors["output"],
            "metric": errors["metric"],
            "error": errors["value"],
            "threshold": errors["threshold"],
            "error/threshold": errors["value"] / errors["threshold"].where(errors["threshold"] > 0),
            "n_bad": errors["n_bad"],
            "max_abs_err": numeric(tests, "metric.max_abs_err"),
        }
    )
    exact = (table["error"] == 0) & (table["n_bad"].fillna(0) == 0)
    table = table[table["metric"].notna() & ~exact]  # a perfect match is no "worst error"
    if table.empty:
        return table
    severity = table["error/threshold"].fillna(table["error"]).fillna(np.inf)
    table = table.assign(_severity=severity).sort_values(["op", "_severity"],
                                                         ascending=[True, False])
    table = table.groupby("op", sort=True).head(per_op).drop(columns="_severity")
    return table.dropna(axis=1, how="all").reset_index(drop=True)


def perf_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per timed perf record: median, IQR, throughput and fraction of the ceiling."""
    perf = with_perf(of_kind(df, "perf"))
    if perf.empty:
        return pd.DataFrame()
    fraction = numeric(perf, "perf.fraction_of_ceiling")
    table = pd.DataFrame(
        {
            "op": perf["op"],
            "backend": perf["backend"],
            "device": column(perf, "device"),
            "case": perf["case_id"],
            "kB": numeric(perf, "perf.bytes") / 1024,
            "median_us": numeric(perf, "perf.median_ns") / 1e3,
            "iqr_us": numeric(perf, "perf.iqr_ns") / 1e3,
            "n": numeric(perf, "perf.n"),
            "GB/s": numeric(perf, "perf.gbps"),
            "GFLOP/s": numeric(perf, "perf.gflops"),
            "bound": column(perf, "perf.bound"),
            "% of ceiling": fraction * 100,
        }
    )
    table = table.sort_values(["op", "kB", "case", "backend"]).reset_index(drop=True)
    return table.dropna(axis=1, how="all")


def scenario_table(df: pd.DataFrame) -> pd.DataFrame:
    """Scenario records: configuration, verdict and (when timed) the median time."""
    scen = of_kind(df, "scenario")
    if scen.empty:
        return pd.DataFrame()
    table = pd.DataFrame(
        {
            "backend": scen["backend"],
            "case": scen["case_id"],
            "split": split_of(scen),
            "devices": devices_of(scen),
            "rope_cache": toggle(scen, "rope_cache"),
            "graph_reuse": toggle(scen, "graph_reuse"),
            "status": scen["status"],
            "reason": column(scen, "reason"),
            "median_ms": numeric(scen, "perf.median_ns") / 1e6,
        }
    )
    return table.dropna(axis=1, how="all").reset_index(drop=True)


def failures(df: pd.DataFrame, limit: int = 50) -> pd.DataFrame:
    """Failing records with their reason, the first ``limit`` of them."""
    if df.empty:
        return pd.DataFrame()
    bad = df[df["status"].isin(FAILING)]
    if bad.empty:
        return pd.DataFrame()
    table = pd.DataFrame(
        {
            "kind": bad["kind"],
            "backend": bad["backend"],
            "case": bad["case_id"],
            "status": bad["status"],
            "reason": column(bad, "reason").fillna(column(bad, "errors")),
        }
    )
    return table.head(limit).reset_index(drop=True)


def speedups(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Speedup of toggle ``name`` (median off / median on) for configurations timed both ways.

    Rows are matched on backend and every other param/scenario setting."""
    timed = with_perf(df)
    if timed.empty:
        return pd.DataFrame()
    switch = toggle(timed, name)
    timed = timed.assign(_switch=switch, _median=numeric(timed, "perf.median_ns"))
    timed = timed[timed["_switch"].notna()]
    if timed.empty:
        return pd.DataFrame()
    config_cols = _config_columns(timed, exclude=name)
    config = timed[config_cols].map(str).agg(" ".join, axis=1) if config_cols else ""
    timed = timed.assign(_config=config)
    medians = timed.groupby(["backend", "_config", "_switch"])["_median"].min().unstack()
    if True not in medians.columns or False not in medians.columns:
        return pd.DataFrame()
    medians = medians.dropna(subset=[True, False])
    labels = _config_labels(timed, config_cols)
    rows = [
        {"backend": b, "config": labels.get(c, c), "speedup": off / on,
         "on_ms": on / 1e6, "off_ms": off / 1e6}
        for (b, c), on, off in zip(medians.index, medians[True], medians[False])
    ]
    return pd.DataFrame(rows)


def _config_columns(df: pd.DataFrame, exclude: str) -> list[str]:
    """Columns that describe a configuration: params and the scenario's settings (not its
    outputs, which differ between the runs being matched), minus the toggle itself."""
    settings = ("scenario.split", "scenario.devices", "scenario.n_devices")
    wanted = [
        c for c in df.columns
        if (c.startswith("param.") or c.startswith("scenario.toggles.") or c in settings)
        and c.split(".")[-1] != exclude
    ]
    return sorted(wanted)


def _config_labels(df: pd.DataFrame, config_cols: list[str]) -> dict[str, str]:
    """Short labels naming only the settings that differ between configurations."""
    varying = [c for c in config_cols if df[c].map(str).nunique() > 1]
    labels = {}
    for _, row in df.iterrows():
        parts = [f"{c.split('.')[-1]}={_short(row[c])}" for c in varying]
        labels[row["_config"]] = ", ".join(parts) or "default"
    return labels


def _short(value) -> str:
    """2.0 -> '2' (pandas turns int columns with gaps into floats), else str()."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def device_scaling(df: pd.DataFrame) -> pd.DataFrame:
    """Best median time per (backend, split, devices) among timed scenario records."""
    timed = with_perf(of_kind(df, "scenario"))
    if timed.empty:
        return pd.DataFrame()
    table = pd.DataFrame(
        {
            "backend": timed["backend"],
            "split": split_of(timed).fillna("none").astype(str),
            "devices": devices_of(timed),
            "median_ms": numeric(timed, "perf.median_ns") / 1e6,
        }
    ).dropna(subset=["devices"])
    if table.empty:
        return table
    best = table.groupby(["backend", "split", "devices"], as_index=False)["median_ms"].min()
    return best.sort_values(["backend", "split", "devices"]).reset_index(drop=True)
