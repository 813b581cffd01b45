"""The result store: JSON Lines records (made by ``records``), one per case x backend x device.

Records are appended and flushed one by one, so a run stopped by Ctrl-C (or a crash) keeps every
record it finished.  ``read_records`` validates what it reads and names the file and line of
anything wrong; ``load_results`` flattens records into a pandas DataFrame for reports and the gate.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .records import DEFAULTS, record_problem


class ResultFileError(Exception):
    """A results file that cannot be read: the message names the file and the line."""


# -- writing -------------------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    # NumPy scalars and arrays, tuples inside params, dataclasses' enums: store plain JSON
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


class ResultWriter:
    """Appends records to a JSON Lines file, one flushed line per record.

    ``with ResultWriter(path) as w: w.write(record)``.  ``fsync=True`` also forces each line to
    disk (survives a power cut, costs a few ms per record)."""

    def __init__(self, path: str | Path, *, fsync: bool = False,
                 stamp: dict | None = None) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.stamp = dict(stamp or {})  # fields every record gets, e.g. {"shard": "1/3"}
        self._file = None
        self.count = 0

    def __enter__(self) -> ResultWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._file is None:
            raise RuntimeError(f"ResultWriter({self.path}) is not open; use it in a with block")
        record = {**record, **self.stamp}
        problem = record_problem(record)
        if problem:
            raise ValueError(f"refusing to write a bad record to {self.path}: {problem}")
        # one write() of a whole line: a reader never sees half a record from a finished write
        self._file.write(json.dumps(record, default=_json_default) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# -- reading -------------------------------------------------------------------------------------
def warn_on_stderr(message: str) -> None:
    print(f"opbench: warning: {message}", file=sys.stderr)


def read_records(path: str | Path, warn: Callable[[str], None] = warn_on_stderr) -> list[dict]:
    """Every record of one file, with optional fields defaulted; ResultFileError on bad input.

    A last line cut short (no newline, not JSON: the writer was killed mid-line) is skipped
    with a warning naming it; every record before it is whole, since each is written as one
    line.  A bad line anywhere else is an error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ResultFileError(f"cannot read results file {path}: {e}") from None
    records = []
    lines = text.splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not text.endswith("\n"):
                warn(f"{path}:{lineno}: skipped a truncated last line ({e.msg}); the"
                     f" {len(records)} record(s) before it are used")
                break
            raise ResultFileError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        problem = record_problem(record)
        if problem:
            raise ResultFileError(f"{path}:{lineno}: {problem}")
        records.append({**DEFAULTS, **record})
    return records


def read_many(paths: Iterable[str | Path]) -> list[dict]:
    records = []
    for path in paths:
        records.extend(read_records(path))
    return records


# -- the DataFrame view --------------------------------------------------------------------------
def flatten(prefix: str, value: Any, into: dict) -> None:
    """Nested dicts become dotted columns; lists stay whole (samples, per-step results)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), inner, into)
    else:
        into[prefix] = value


def record_row(record: dict, source: str = "") -> dict:
    """One DataFrame row: top-level scalars plus param.*, metric.*, perf.*, scenario.*, env.*."""
    row = {k: v for k, v in record.items() if not isinstance(v, (dict, list)) and v is not None}
    row["reason"] = record.get("reason")
    row["errors"] = "; ".join(str(e) for e in record.get("errors") or [])
    row["source"] = source
    flatten("param", record.get("params") or {}, row)
    flatten("metric", record.get("metrics") or {}, row)
    flatten("perf", record.get("perf") or {}, row)
    flatten("scenario", record.get("scenario") or {}, row)
    env = record.get("env") or {}
    flatten("env", {k: v for k, v in env.items() if k != "backend_info"}, row)
    return row


def records_frame(records: Iterable[dict], source: str = ""):
    import pandas as pd

    rows = [record_row(r, source) for r in records]
    return pd.DataFrame(rows)


def record_key(record: dict) -> tuple:
    """What makes records the same case: a later one of the same key supersedes it."""
    return (record["kind"], record["backend"], record.get("device") or "", record["case_id"])


def load_results(paths: str | Path | Iterable[str | Path]):
    """One DataFrame row per record of all ``paths`` (a ``source`` column names the file)."""
    import pandas as pd

    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames = [records_frame(read_records(p), source=str(p)) for p in paths]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["kind", "backend", "op", "case_id", "status", "source"])
    return pd.concat(frames, ignore_index=True, sort=False)
