"""Results DataFrame -> the report's tables (plain DataFrames; rendering is elsewhere)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from opbench.harness.records import FAILING, PASSING
from opbench.harness.scenario.splits import SEQUENCE_SPLITS
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
    counts.columns.name = None  # else a header row named "status" over an empty column
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


def error_vs_world_size(df: pd.DataFrame) -> pd.DataFrame:
    """Worst per-step error (``scenario.per_step``) per split and device count, for the
    sequence splits (ring, zigzag, stripe) recorded at two or more device counts: what
    ``opbench scenario --sweep devices=A..B`` writes."""
    scen = of_kind(df, "scenario")
    if scen.empty or "scenario.per_step" not in scen.columns:
        return pd.DataFrame()
    rows = [{"split": split, "devices": devices,
             "nmse": max(step["nmse"] for step in steps),
             "max_rel": max(step["max_rel"] for step in steps)}
            for split, devices, steps in zip(split_of(scen), devices_of(scen),
                                             scen["scenario.per_step"])
            if split in SEQUENCE_SPLITS and isinstance(steps, list) and steps
            and not pd.isna(devices)]
    table = pd.DataFrame(rows, columns=["split", "devices", "nmse", "max_rel"])
    swept = table.groupby("split")["devices"].transform("nunique") >= 2
    worst = table[swept].groupby(["split", "devices"], as_index=False)[["nmse", "max_rel"]].max()
    return worst.sort_values(["split", "devices"]).reset_index(drop=True)


# -- number formatting: one unit and precision per column --------------------------------------
TIME_UNITS = (("s", 1e9), ("ms", 1e6), ("µs", 1e3), ("ns", 1.0))


def time_unit(values_ns) -> tuple[str, float]:
    """The unit in which the median of ``values_ns`` reads as 1..999."""
    values = pd.to_numeric(pd.Series(values_ns), errors="coerce").dropna()
    typical = float(values.median()) if not values.empty else 1.0
    for name, scale in TIME_UNITS:
        if typical >= scale:
            return name, scale
    return TIME_UNITS[-1]


def format_duration_ns(value) -> str:
    """One duration in the unit that suits it, 3 significant digits: 812 µs, 1.52 ms."""
    if value is None or value != value:
        return "-"
    name, scale = time_unit([value])
    return f"{value / scale:.3g} {name}"


def fixed_decimals(values: pd.Series, digits: int = 3) -> pd.Series:
    """Numbers of one column with the same number of decimals (enough for ``digits``
    significant digits on the column's median), blanks for missing values."""
    numbers = pd.to_numeric(values, errors="coerce")
    finite = numbers.dropna().abs()
    typical = float(finite.median()) if not finite.empty and finite.median() > 0 else 1.0
    decimals = max(0, digits - 1 - int(np.floor(np.log10(typical))))
    return numbers.map(lambda v: "" if pd.isna(v) else f"{v:,.{decimals}f}")


# -- latest wins, headline, environment ----------------------------------------------------------
CASE_KEY = ["kind", "backend", "device", "case_id"]


def latest_per_case(df: pd.DataFrame) -> pd.DataFrame:
    """A case written twice into one file (a re-run appended) counts once: the last record
    wins, as in the gate.  Records of different files are all kept."""
    if df.empty:
        return df
    keys = [c for c in ["source", *CASE_KEY] if c in df.columns]
    frame = df.assign(device=column(df, "device").fillna("")) if "device" in keys else df
    return df[~frame.duplicated(subset=keys, keep="last")]


def outcome_counts(df: pd.DataFrame) -> dict[str, int]:
    """Cases passed / failed / xfail / unsupported among test and scenario records."""
    judged = df[df["kind"] != "perf"] if not df.empty else df
    status = judged["status"] if not judged.empty else pd.Series(dtype=object)
    return {"passed": int(status.isin(PASSING).sum()), "failed": int(status.isin(FAILING).sum()),
            "xfail": int((status == "XFAIL").sum()),
            "unsupported": int((status == "UNSUPPORTED").sum())}


ENV_ROWS = (("machine", "env.machine"), ("CPU", "env.cpu_model"), ("GPU", "env.gpus"),
            ("OS", "env.platform"), ("Python", "env.python"), ("opbench", "env.opbench"),
            ("numpy", "env.numpy"), ("torch", "env.torch"), ("ggml", "env.ggml"),
            ("triton", "env.triton"), ("cupy", "env.cupy"), ("commit", "env.git_commit"))


def _distinct(values: pd.Series) -> str:
    seen = []
    for value in values:
        text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        if isinstance(value, (list, tuple)) and not value:
            text = "none"
        if text is None or (isinstance(text, float) and np.isnan(text)):
            continue
        if str(text) not in seen:
            seen.append(str(text))
    return "; ".join(seen) if seen else "not recorded"


def environment_table(df: pd.DataFrame) -> pd.DataFrame:
    """Where the data came from: machine, CPU, GPU, OS, versions, commit, runs and times."""
    if df.empty:
        return pd.DataFrame()
    rows = [(name, _distinct(df[col]) if col in df.columns else "not recorded")
            for name, col in ENV_ROWS]
    times = column(df, "time")
    for run_id, group in df.groupby(column(df, "run_id").fillna("?"), sort=True):
        stamps = times[group.index].dropna().astype(str).sort_values()
        span = f"{stamps.iloc[0]} .. {stamps.iloc[-1]}" if not stamps.empty else ""
        rows.append((f"run {run_id}", f"{len(group)} records {span}".strip()))
    return pd.DataFrame(rows, columns=["recorded", "value"])


# -- perf pivot --------------------------------------------------------------------------------
VERDICT_CLASS = {"regression": "slower", "improvement": "faster", "unchanged": "same",
                 "not significant": "unsure"}


def perf_labels(perf: pd.DataFrame) -> pd.Series:
    """Backend names; a backend found in several files is told apart by the file's name."""
    sources = column(perf, "source").fillna("").astype(str)
    label = perf["backend"].astype(str)
    per_backend = sources.groupby(label).transform("nunique")
    stems = sources.map(lambda s: s.rsplit("/", 1)[-1].removesuffix(".jsonl"))
    return label.where(per_backend <= 1, label + " [" + stems + "]")


def _verdict(base, other, threshold: float) -> str:
    from opbench.perf import stats

    if not isinstance(base, (list, tuple)) or not isinstance(other, (list, tuple)):
        return "not significant"
    return stats.compare_samples(base, other, threshold=threshold).verdict


def perf_pivot(df: pd.DataFrame, baseline: str | None = None,
               threshold: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Case rows x backend columns of median time, one unit per column, and the ratio of each
    backend's time to ``baseline``'s.  Returns (text table, CSS classes of its cells: the
    gate's verdict of each ratio).  ValueError when ``baseline`` did not run."""
    perf = with_perf(of_kind(df, "perf"))
    if perf.empty:
        return pd.DataFrame(), pd.DataFrame()
    perf = perf.assign(_label=perf_labels(perf), _ns=numeric(perf, "perf.median_ns"),
                       _mib=numeric(perf, "perf.bytes") / 2**20,
                       _samples=column(perf, "perf.samples_ns"))
    perf = perf.drop_duplicates(["op", "case_id", "_label"], keep="last")
    labels = sorted(perf["_label"].unique())
    baseline = baseline or ("cpu" if "cpu" in labels else labels[0])
    if baseline not in labels:
        raise ValueError(f"--baseline {baseline!r} has no perf records; "
                         f"choose from {', '.join(labels)}")
    rows = perf.groupby(["op", "case_id"], sort=False).agg(_mib=("_mib", "max")).reset_index()
    rows = rows.sort_values(["op", "_mib", "case_id"]).reset_index(drop=True)
    text = pd.DataFrame({"op": rows["op"], "case": rows["case_id"],
                         "MiB": fixed_decimals(rows["_mib"])})
    classes = pd.DataFrame("", index=text.index, columns=text.columns)
    classes["case"] = "id"
    cell = perf.set_index(["op", "case_id", "_label"])
    index = list(zip(rows["op"], rows["case_id"]))
    for label in [baseline, *[lab for lab in labels if lab != baseline]]:
        times = pd.Series([cell["_ns"].get((*k, label), np.nan) for k in index])
        unit, scale = time_unit(times)
        text[f"{label} ({unit})"] = fixed_decimals(times / scale).replace("", "-")
        classes[f"{label} ({unit})"] = "num"
        if label == baseline:
            base_times = times
            continue
        ratio = times / base_times
        verdicts = [_verdict(cell["_samples"].get((*k, baseline)),
                             cell["_samples"].get((*k, label)), threshold)
                    if pd.notna(r) else "" for k, r in zip(index, ratio)]
        name = f"{label} / {baseline}"
        text[name] = [f"{r:.2f}× ({VERDICT_CLASS[v]})" if pd.notna(r) else "-"
                      for r, v in zip(ratio, verdicts)]
        classes[name] = ["num " + VERDICT_CLASS.get(v, "") for v in verdicts]
    return text, classes
