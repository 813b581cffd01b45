"""Helpers to read the flattened results DataFrame whatever optional columns a run produced."""

from __future__ import annotations

import numpy as np
import pandas as pd

DTYPE_ORDER = ("f32", "f16", "bf16")
SWITCH_ON = {"on", "true", "1", "yes"}
SWITCH_OFF = {"off", "false", "0", "no"}


def column(df: pd.DataFrame, *names: str) -> pd.Series:
    """The first of ``names`` that exists, filled from the later ones where it is missing;
    an all-NaN series when none exists."""
    result = pd.Series(np.nan, index=df.index, dtype=object)
    for name in reversed(names):
        if name in df.columns:
            values = df[name]
            result = values.where(values.notna(), result)
    return result


def numeric(df: pd.DataFrame, *names: str) -> pd.Series:
    return pd.to_numeric(column(df, *names), errors="coerce")


def of_kind(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    if df.empty or "kind" not in df.columns:
        return df.iloc[0:0]
    return df[df["kind"] == kind]


def with_perf(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with a timing median (perf and scenario records that were timed)."""
    if "perf.median_ns" not in df.columns:
        return df.iloc[0:0]
    return df[pd.to_numeric(df["perf.median_ns"], errors="coerce") > 0]


def as_switch(value) -> bool | None:
    """True/False/'on'/'off'/1/0 -> bool; anything else None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in SWITCH_ON:
        return True
    if text in SWITCH_OFF:
        return False
    return None


def toggle(df: pd.DataFrame, name: str) -> pd.Series:
    """A scenario toggle (rope_cache, graph_reuse, ...) wherever the runner stored it."""
    raw = column(df, f"param.{name}", f"scenario.{name}", f"scenario.toggles.{name}")
    return raw.map(lambda v: None if _missing(v) else as_switch(v))


def split_of(df: pd.DataFrame) -> pd.Series:
    return column(df, "scenario.split", "param.split")


def devices_of(df: pd.DataFrame) -> pd.Series:
    raw = column(
        df, "scenario.n_devices", "param.n_devices", "scenario.devices", "param.devices"
    )
    return raw.map(lambda v: len(v) if isinstance(v, (list, tuple)) else v).pipe(
        pd.to_numeric, errors="coerce"
    )


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def dtype_sort_key(name: str) -> tuple[int, str]:
    return (DTYPE_ORDER.index(name) if name in DTYPE_ORDER else len(DTYPE_ORDER), str(name))


ERROR_COLUMNS = ("output", "metric", "value", "threshold", "n_bad")


def _flat_metric(row: pd.Series) -> dict | None:
    """The error of a record whose metrics are flat: {nmse, max_abs_err, threshold, n_bad}."""
    value = row.get("metric.nmse")
    if _missing(value):
        return None
    return {"output": "", "metric": "nmse", "value": float(value),
            "threshold": row.get("metric.threshold"), "n_bad": row.get("metric.n_bad")}


def _severity(error: dict) -> float:
    """How bad, comparably across outputs: value / threshold (NaN, the worst, is infinite)."""
    value, threshold = error["value"], error.get("threshold")
    if _missing(value):
        return np.inf
    if threshold and not _missing(threshold) and threshold > 0:
        return value / threshold
    return value


def record_error(row: pd.Series, outputs: list[str]) -> dict | None:
    """The worst output error of one record: per-output metrics ({out: {metric, value,
    threshold, n_bad}}, what the runner writes) or flat ones."""
    candidates = []
    for out in outputs:
        metric = row.get(f"metric.{out}.metric")
        if _missing(metric):  # this record has no such output (a NaN *value* is an error)
            continue
        value = pd.to_numeric(row.get(f"metric.{out}.value"), errors="coerce")
        candidates.append({"output": out, "metric": metric, "value": float(value),
                           "threshold": row.get(f"metric.{out}.threshold"),
                           "n_bad": row.get(f"metric.{out}.n_bad")})
    flat = _flat_metric(row)
    if flat:
        candidates.append(flat)
    return max(candidates, key=_severity) if candidates else None


def error_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Per row: the worst error's output, metric name, value, threshold and bad-element count."""
    outputs = sorted(
        c[len("metric."):-len(".value")] for c in df.columns
        if c.startswith("metric.") and c.endswith(".value")
    )
    rows = [record_error(row, outputs) or {} for _, row in df.iterrows()]
    table = pd.DataFrame(rows, index=df.index, columns=list(ERROR_COLUMNS))
    table["value"] = pd.to_numeric(table["value"], errors="coerce")
    table["threshold"] = pd.to_numeric(table["threshold"], errors="coerce")
    return table
