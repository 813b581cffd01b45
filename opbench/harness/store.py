"""The result store: JSON Lines records, one per case x backend x device.

Records are appended and flushed one by one, so a run stopped by Ctrl-C (or a crash) keeps every
record it finished.  ``read_records`` validates what it reads and names the file and line of
anything wrong; ``load_results`` flattens records into a pandas DataFrame for reports and the gate.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import subprocess
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
KINDS = ("test", "perf", "scenario")
STATUSES = ("OK", "FAIL", "XFAIL", "XPASS", "UNSUPPORTED", "ERROR", "CRASH", "TIMEOUT")
REQUIRED_FIELDS = ("schema", "kind", "run_id", "backend", "op", "case_id", "status")
#: optional fields and the value a record gets when it leaves them out
DEFAULTS: dict[str, Any] = {
    "time": None,
    "device": "",
    "params": {},
    "dtype": "",
    "reason": None,
    "metrics": {},
    "errors": [],
    "perf": None,
    "scenario": None,
    "env": {},
}


class ResultFileError(Exception):
    """A results file that cannot be read: the message names the file and the line."""


def new_run_id() -> str:
    """Sortable by time, unique across machines: 20261122T041959Z-1a2b3c4d."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:8]}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


# -- environment ---------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's marketing name; the key of the calibrated ceilings."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_commit(directory: str | Path | None = None) -> str | None:
    """HEAD of the repository holding ``directory`` (the opbench sources by default), if any."""
    where = Path(directory) if directory else Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict:
    # computed once per process: git and /proc are too slow to ask once per record
    import numpy

    import opbench

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "opbench": opbench.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
    }


def environment(backend_info: dict | None = None) -> dict:
    """Versions, platform, CPU model, git commit, plus the backend's own ``info()`` dict."""
    env = dict(_static_environment())
    env["backend_info"] = dict(backend_info or {})
    return env


# -- writing -------------------------------------------------------------------------------------
def make_record(
    *,
    kind: str,
    backend: str,
    op: str,
    case_id: str,
    status: str,
    run_id: str,
    device: str = "",
    params: dict | None = None,
    dtype: str = "",
    reason: str | None = None,
    metrics: dict | None = None,
    errors: list[str] | None = None,
    perf: dict | None = None,
    scenario: dict | None = None,
    env: dict | None = None,
) -> dict:
    """A complete record with the schema version and the current time filled in."""
    record = {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "run_id": run_id,
        "time": utc_now(),
        "backend": backend,
        "device": device,
        "op": op,
        "case_id": case_id,
        "params": dict(params or {}),
        "dtype": dtype,
        "status": status,
        "reason": reason,
        "metrics": dict(metrics or {}),
        "errors": list(errors or []),
        "perf": perf,
        "scenario": scenario,
        "env": env if env is not None else environment(),
    }
    problem = record_problem(record)
    if problem:
        raise ValueError(f"bad result record for {case_id!r}: {problem}")
    return record


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

    def __init__(self, path: str | Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
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
def record_problem(record: Any) -> str | None:
    """What is wrong with a record, or None.  Newer schemas are rejected, not guessed at."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        return f"missing required field(s) {', '.join(missing)}"
    schema = record["schema"]
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        return f"schema={schema!r} must be a positive integer"
    if schema > SCHEMA_VERSION:
        return (
            f"schema={schema} is newer than this opbench reads (schema {SCHEMA_VERSION}); "
            "upgrade opbench"
        )
    if record["kind"] not in KINDS:
        return f"kind={record['kind']!r} must be one of {', '.join(KINDS)}"
    if record["status"] not in STATUSES:
        return f"status={record['status']!r} must be one of {', '.join(STATUSES)}"
    return None


def read_records(path: str | Path) -> list[dict]:
    """Every record of one file, with optional fields defaulted; ResultFileError on bad input."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ResultFileError(f"cannot read results file {path}: {e}") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
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
