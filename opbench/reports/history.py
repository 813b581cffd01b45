"""History queries over the results database, as pandas DataFrames, and step detection.

``series`` gives one row per case, timing method and commit: the median time (median over that
commit's runs) and the worst error.  A case timed both with and without ``perf --repeat`` has one
series per method (``timing``): the method alone moves its times (``perf/method.py``), so a step
between them would say nothing about the code, and a commit's median must not mix them.
``change_points`` finds where a case's time stepped, as asv does: the
series of log times is fitted by a piecewise-constant signal (PELT, from the ``ruptures``
library, L2 cost) with a penalty scaled to the series' own noise, and steps smaller than
``min_change`` are dropped.  Each step names the first commit of the new level.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from datetime import datetime

import numpy as np
import pandas as pd

#: below this relative noise a series is treated as this noisy (runs of one machine wobble)
NOISE_FLOOR = 0.02
#: the penalty of one more step, in units of noise variance x log(points) (BIC-like)
PENALTY_SCALE = 2.0
DEFAULT_MIN_CHANGE = 0.05

_ORDER = "COALESCE(r.commit_time, r.started, r.imported_at)"


def runs(conn: sqlite3.Connection, since: str | None = None) -> pd.DataFrame:
    """Every run, grouped by commit, commits oldest first: ``position`` is the commit's place.

    A commit sits at its commit date when git knew it at import, else at its first run's start
    (else its first import).  The first run, not each run: runs of one commit made at different
    times (perf today, a scenario run made last week) must not split the commit across places
    in history, and a commit measured again later must not become the latest."""
    frame = pd.read_sql_query(
        f"SELECT r.run_id, r.commit_sha AS 'commit', r.branch, r.commit_time, r.started,"
        f" r.finished, r.source, {_ORDER} AS ordered_at,"
        " (SELECT COUNT(*) FROM records x WHERE x.run_id = r.run_id) AS records"
        f" FROM runs r ORDER BY {_ORDER}, r.run_id", conn)
    frame = frame.assign(commit_label=commit_label(frame))
    first_seen = {label: i for i, label in enumerate(dict.fromkeys(frame["commit_label"]))}
    frame = frame.assign(position=frame["commit_label"].map(first_seen))
    frame = frame.assign(commit_at=frame.groupby("position")["ordered_at"].transform("min"))
    frame = frame.sort_values("position", kind="stable").reset_index(drop=True)
    return _since(frame, since)


class SinceError(ValueError):
    """A ``--since`` value that names no commit of the database, git ref or date."""


def _since(frame: pd.DataFrame, since: str | None) -> pd.DataFrame:
    """Rows from the first commit that ``since`` names: a commit of the database (sha prefix
    or label), a git ref of the current folder's repository (a tag such as v1.0), or an ISO
    date (commits placed on or after it).  SinceError for anything else."""
    if not since or frame.empty:
        return frame
    position = _commit_position(frame, since)
    if position is None:
        position = _ref_position(frame, since)
    if position is not None:
        return frame[frame["position"] >= position]
    return frame[_placed_at(frame) >= _date(since)]


def _commit_position(frame: pd.DataFrame, sha: str) -> int | None:
    """The place of the database's commit whose sha starts with ``sha`` (or is labelled it)."""
    commits = frame["commit"].fillna("")
    named = commits.str.startswith(sha.lower()) | (frame["commit_label"] == sha)
    if not named.any():  # a sha recorded shorter than the one asked for (a full rev-parse)
        named = commits.map(lambda c: len(c) >= 7 and sha.lower().startswith(c))
    return int(frame.loc[named, "position"].min()) if named.any() else None


def _ref_position(frame: pd.DataFrame, ref: str) -> int | None:
    """The place of the commit git resolves ``ref`` to, None when git does not know it;
    SinceError when git knows it but the database has no run of it."""
    sha = resolve_git_ref(ref)
    if sha is None:
        return None
    position = _commit_position(frame, sha)
    if position is None:
        raise SinceError(f"--since {ref} is commit {sha[:7]}, which has no run in the database")
    return position


def resolve_git_ref(ref: str) -> str | None:
    """The full sha of ``ref`` in the current folder's git repository, or None."""
    import subprocess

    if ref.startswith("-"):  # never an option to git
        return None
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _date(since: str) -> pd.Timestamp:
    """``since`` as a UTC time (a date without a zone is UTC); SinceError when it is none."""
    try:
        moment = pd.Timestamp(datetime.fromisoformat(since))
    except ValueError:
        raise SinceError(f"--since {since}: not a commit in the database, a git ref or an ISO "
                         "date (a sha prefix, a tag such as v1.0, or 2026-01-31)") from None
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")


def _placed_at(frame: pd.DataFrame) -> pd.Series:
    """Each run's commit place as a UTC time (the commit date, else its first run)."""
    return pd.to_datetime(frame["commit_at"], utc=True, format="ISO8601", errors="coerce")


def commit_label(frame: pd.DataFrame) -> pd.Series:
    """A short commit name per run (the run id where no commit was recorded)."""
    return frame["commit"].fillna("").str[:7].where(frame["commit"].notna(), frame["run_id"])


def _select(frame: pd.DataFrame, *, kind, backends, ops, pattern) -> pd.DataFrame:
    keep = pd.Series(True, index=frame.index)
    if kind:
        keep &= frame["kind"] == kind
    if backends:
        keep &= frame["backend"].isin(backends)
    if ops:
        keep &= frame["op"].isin(ops)
    if pattern:
        keep &= frame["case_id"].map(lambda c: bool(re.search(pattern, c)))
    return frame[keep]


def _timing_label(record_json: str) -> str:
    """The record's timing method for a series ("" when it holds no samples)."""
    from opbench.perf.method import timing_method

    method = timing_method(json.loads(record_json))
    return method.series_label() if method else ""


def _untimed_join_their_series(frame: pd.DataFrame) -> pd.DataFrame:
    """A record without samples (UNSUPPORTED, a test) joins its case's one method, if one."""
    methods = frame[frame["timing"] != ""].groupby(CASE, dropna=False)["timing"].agg(
        lambda values: values.iloc[0] if values.nunique() == 1 else "")
    if methods.empty:
        return frame
    single = frame[CASE].apply(tuple, axis=1).map(methods).fillna("")
    return frame.assign(timing=frame["timing"].where(frame["timing"] != "", single))


def records(conn: sqlite3.Connection, *, since: str | None = None, kind: str | None = None,
            backends=None, ops=None, pattern: str | None = None) -> pd.DataFrame:
    """One row per stored record with its run's commit, position in history and timing
    method (``timing``: "one run", "--repeat, anchored", ...; "" without samples)."""
    order = runs(conn, since)
    if order.empty:
        return pd.DataFrame()
    conn.create_function("opbench_timing", 1, _timing_label, deterministic=True)
    frame = pd.read_sql_query(
        "SELECT run_id, kind, backend, device, op, case_id, dtype, status, median_ns, error,"
        " error_ratio, opbench_timing(record) AS timing FROM records", conn)
    frame = frame.merge(order[["run_id", "commit", "commit_label", "position"]], on="run_id")
    frame = _select(frame, kind=kind, backends=backends, ops=ops, pattern=pattern)
    return _untimed_join_their_series(frame) if not frame.empty else frame


CASE = ["kind", "backend", "device", "op", "case_id"]
#: a case's series: one per timing method, never joined (their times do not compare)
SERIES = [*CASE, "timing"]


def series(conn: sqlite3.Connection, **selection) -> pd.DataFrame:
    """Per case and commit: median time (ns), worst error, its ratio to the threshold, the
    last status, and how many runs the commit had.  Ordered by case, then history."""
    frame = records(conn, **selection)
    if frame.empty:
        return pd.DataFrame(columns=[*SERIES, "commit", "median_ns", "error"])
    frame = frame.sort_values("position")
    grouped = frame.groupby([*SERIES, "commit_label"], sort=False, dropna=False)
    table = grouped.agg(position=("position", "min"), commit=("commit", "first"),
                        median_ns=("median_ns", "median"), error=("error", "max"),
                        error_ratio=("error_ratio", "max"), status=("status", "last"),
                        runs=("run_id", "nunique")).reset_index()
    return table.sort_values([*SERIES, "position"]).reset_index(drop=True)


def _noise(log_values: np.ndarray) -> float:
    """Robust noise of a series: MAD of neighbour differences (a step moves one difference
    only, so it barely shifts the median), floored at NOISE_FLOOR."""
    if len(log_values) < 3:
        return NOISE_FLOOR
    mad = np.median(np.abs(np.diff(log_values)))
    return max(1.4826 * mad / math.sqrt(2), NOISE_FLOOR)


def step_indices(values, *, min_change: float = DEFAULT_MIN_CHANGE) -> list[int]:
    """Indices where a new level of ``values`` (positive times) starts."""
    import ruptures

    values = np.asarray(values, dtype=float)
    if len(values) < 2 or not np.all(values > 0):
        return []
    signal = np.log(values)
    sigma = _noise(signal)
    penalty = PENALTY_SCALE * sigma**2 * math.log(len(signal)) * 2
    ends = ruptures.Pelt(model="l2", min_size=1, jump=1).fit(signal).predict(pen=penalty)
    bounds = [0, *ends]
    steps = []
    for start, middle, end in zip(bounds, bounds[1:], bounds[2:]):
        before, after = np.median(values[start:middle]), np.median(values[middle:end])
        if abs(after / before - 1) >= min_change:
            steps.append(middle)
    return steps


def change_points(table: pd.DataFrame, *, min_change: float = DEFAULT_MIN_CHANGE) -> pd.DataFrame:
    """One row per step in each series' median time (a case and its timing method): the
    commit where the new level starts, the levels before and after (medians of the segments)
    and their ratio."""
    rows = []
    timed = table[table["median_ns"].notna()]
    for key, case in timed.groupby(SERIES, sort=True, dropna=False):
        values = case["median_ns"].to_numpy(dtype=float)
        labels = case["commit_label"].tolist()
        cuts = step_indices(values, min_change=min_change)
        bounds = [0, *cuts, len(values)]
        for i, cut in enumerate(cuts):
            before = float(np.median(values[bounds[i]:cut]))
            after = float(np.median(values[cut:bounds[i + 2]]))
            rows.append({**dict(zip(SERIES, key)), "commit": labels[cut],
                         "previous": labels[cut - 1], "before_ns": before, "after_ns": after,
                         "ratio": after / before})
    return pd.DataFrame(rows, columns=[*SERIES, "commit", "previous", "before_ns", "after_ns",
                                       "ratio"])


def summary(table: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """Per series (case and timing method): commits seen, first and latest median time,
    worst error, and its steps."""
    if table.empty:
        return pd.DataFrame()
    grouped = table.groupby(SERIES, sort=True, dropna=False)
    out = grouped.agg(commits=("commit_label", "nunique"), first_ns=("median_ns", "first"),
                      latest_ns=("median_ns", "last"), worst_error=("error", "max"),
                      status=("status", "last")).reset_index()
    described = {
        key: "; ".join(f"{r.commit}: x{r.ratio:.2f}" for r in group.itertuples())
        for key, group in steps.groupby(SERIES, sort=False, dropna=False)
    } if not steps.empty else {}
    out["steps"] = [described.get(tuple(row), "") for row in out[SERIES].itertuples(index=False)]
    return out


def wide(table: pd.DataFrame, value: str = "median_ns") -> pd.DataFrame:
    """Series (case and timing method) as rows, commits (in history order) as columns,
    ``value`` in the cells."""
    if table.empty:
        return pd.DataFrame()
    order = table.sort_values("position").drop_duplicates("commit_label")["commit_label"]
    pivot = table.pivot_table(index=SERIES, columns="commit_label", values=value, aggfunc="first",
                              dropna=False)
    return pivot.reindex(columns=[c for c in order if c in pivot.columns])


# -- a report from the database ----------------------------------------------------------------
def stored_records(conn: sqlite3.Connection, run_ids) -> list[dict]:
    """The full records of ``run_ids`` as they were imported."""
    import json

    ids = list(run_ids)
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    rows = conn.execute(f"SELECT record FROM records WHERE run_id IN ({marks}) ORDER BY id", ids)
    return [json.loads(text) for (text,) in rows]


def latest_and_previous(conn: sqlite3.Connection, since: str | None = None):
    """(latest commit's label, its run ids, previous commit's label, its run ids); the
    previous is the first run of ``since`` when given, else the commit before the latest."""
    order = runs(conn)
    if order.empty:
        return None, [], None, []
    labels = list(dict.fromkeys(order["commit_label"]))
    latest = labels[-1]
    chosen = _since(order, since) if since else order
    earlier = [lab for lab in dict.fromkeys(chosen["commit_label"]) if lab != latest]
    previous = (earlier[0] if since else earlier[-1]) if earlier else None
    ids = lambda label: list(order.loc[order["commit_label"] == label, "run_id"])  # noqa: E731
    return latest, ids(latest), previous, ids(previous) if previous else []


def write_db_report(conn: sqlite3.Connection, out_dir, *, since: str | None = None,
                    baseline: str | None = None, min_change: float = DEFAULT_MIN_CHANGE):
    """The report of the latest commit's runs, compared by the gate with the previous commit's
    (or with the first of ``since``), plus the history of every case since then."""
    from opbench.harness import store
    from opbench.perf.gate import gate
    from opbench.reports import plots, render

    latest, latest_ids, previous, previous_ids = latest_and_previous(conn, since)
    new = stored_records(conn, latest_ids)
    comparison = None
    if previous:
        comparison = render.Comparison(f"commit {latest} against {previous}",
                                       gate(stored_records(conn, previous_ids), new))
    table = series(conn, since=since or previous)
    extra = []
    if not table.empty and table["commit_label"].nunique() > 1:
        steps = change_points(table, min_change=min_change)
        figure = render.Figure("history", "Median time per commit",
                               png=render.figure_png(plots.history_figure(table, steps)))
        overview = summary(table, steps)
        overview = overview.assign(first=overview["first_ns"].map(_duration),
                                   latest=overview["latest_ns"].map(_duration))
        timing = ["timing"] if overview["timing"].nunique() > 1 else []  # kept apart
        overview = overview[["backend", "case_id", *timing, "commits", "first", "latest",
                             "steps", "worst_error", "status"]]
        extra.append(render.Section(
            "History", note=f"Per case across {table['commit_label'].nunique()} commits; "
            "a step is a change point of the median time (at the first commit of the new level)"
            "; a case timed with and without perf --repeat has a row per method, each with "
            "its own steps.",
            tables=[render.Table(overview, render.id_classes(overview, "case_id"))],
            figures=[figure], beside=False))
    sources = [f"database runs {', '.join(latest_ids)}"]
    return render.write_report(store.records_frame(new), out_dir, sources=sources,
                               baseline=baseline, comparison=comparison, extra=extra,
                               title=_db_report_title(latest, new),
                               not_compared=_not_compared(latest, since))


def _db_report_title(latest: str | None, records: list[dict]) -> str:
    """The commit the runs were imported as; when the runs recorded another git commit (an
    import given --commit), that one too, as the Environment section shows it."""
    recorded = dict.fromkeys(str((r.get("env") or {}).get("git_commit") or "") for r in records)
    other = [sha[:7] for sha in recorded if sha and latest
             and not (sha.startswith(latest) or latest.startswith(sha))]
    if not other:
        return f"opbench report: commit {latest}"
    return (f"opbench report: commit {latest} (as imported; its runs recorded git commit "
            f"{', '.join(other)})")


def _not_compared(latest: str | None, since: str | None) -> str:
    """Why the database gave nothing to compare the latest commit with."""
    if latest is None:
        return "the database holds no run"
    if since:
        return f"--since {since} names no commit before the latest ({latest}) in the database"
    return f"the database holds no commit before {latest}"


def _duration(value) -> str:
    from opbench.reports.tables import format_duration_ns

    return format_duration_ns(value)
