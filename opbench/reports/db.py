"""Results over time: runs imported into one SQLite file (stdlib ``sqlite3``, no server).

One row per run (its commit, branch and times) and one per record (the columns the history asks
for, plus the whole record as JSON so a report can be rebuilt from the database alone).

- The schema version lives in ``PRAGMA user_version``; ``MIGRATIONS`` bring an older file up to
  date when it is opened, and a file written by a newer opbench is refused, never guessed at.
- An import is one transaction: a killed import leaves the database as it was.
- Imports are idempotent by run id: a run already in the database is skipped.
- Parallel CI jobs may import into one file: WAL journal, a busy timeout and retries.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from opbench.harness import store
from opbench.harness.records import utc_now

DEFAULT_DB = "opbench.sqlite"
BUSY_TIMEOUT_S = 30.0
BUSY_RETRIES = 5

#: one script per schema version: MIGRATIONS[i] takes a database from version i to i + 1
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        commit_sha TEXT,
        branch TEXT,
        started TEXT,
        finished TEXT,
        source TEXT,
        imported_at TEXT NOT NULL,
        env TEXT NOT NULL
    );
    CREATE TABLE records (
        id INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        backend TEXT NOT NULL,
        device TEXT NOT NULL,
        op TEXT NOT NULL,
        case_id TEXT NOT NULL,
        dtype TEXT,
        status TEXT NOT NULL,
        time TEXT,
        median_ns REAL,
        error REAL,
        error_ratio REAL,
        record TEXT NOT NULL
    );
    """,
    # v2: the commit's own date orders history when git knows it; an index for per-case series
    """
    ALTER TABLE runs ADD COLUMN commit_time TEXT;
    CREATE INDEX records_case ON records(kind, backend, device, case_id);
    CREATE INDEX records_run ON records(run_id);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class DatabaseError(Exception):
    """A database that cannot be used (corrupt, newer schema, unwritable): one-line message."""


@dataclass
class ImportResult:
    imported: list[str] = field(default_factory=list)  # run ids added
    skipped: list[str] = field(default_factory=list)  # run ids already present
    records: int = 0


# -- opening ---------------------------------------------------------------------------------------
def connect(path: str | Path = DEFAULT_DB, *, create: bool = True) -> sqlite3.Connection:
    """Open (and migrate) the database at ``path``; DatabaseError when it cannot be used."""
    path = Path(path)
    if not create and not path.exists():
        raise DatabaseError(f"no database {path} (make one with `opbench db import`)")
    if path.exists() and path.is_dir():
        raise DatabaseError(f"database {path} is a directory")
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        _retry_while_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
        conn.execute("PRAGMA foreign_keys=ON")
        _migrate(conn, path)
    except sqlite3.DatabaseError as e:
        raise DatabaseError(f"cannot use database {path}: {e}") from None
    return conn


def _locked(error: sqlite3.OperationalError) -> bool:
    return "locked" in str(error) or "busy" in str(error)


def _retry_while_locked(action, attempts: int = 12):
    """Switching a new file to WAL needs a lock SQLite does not wait for (no busy handler):
    several CI jobs creating one database at once see "database is locked" at once.  Retry with
    backoff (up to ~20 s in all), then let the error through."""
    for attempt in range(attempts):
        try:
            return action()
        except sqlite3.OperationalError as e:
            if not _locked(e) or attempt == attempts - 1:
                raise
            time.sleep(min(0.05 * 2**attempt, 5.0))


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = schema_version(conn)
    if version > SCHEMA_VERSION:
        conn.close()
        raise DatabaseError(
            f"database {path} has schema {version}, newer than this opbench reads "
            f"(schema {SCHEMA_VERSION}); upgrade opbench"
        )
    if version == SCHEMA_VERSION:
        return
    with _transaction(conn):
        version = schema_version(conn)  # another process may have migrated while we waited
        for script in MIGRATIONS[version:]:
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


class _transaction:
    """BEGIN IMMEDIATE (the write lock up front, so two writers never deadlock) with retries
    while another process holds it; COMMIT on success, ROLLBACK on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        _retry_while_locked(lambda: self.conn.execute("BEGIN IMMEDIATE"), BUSY_RETRIES + 1)
        return self.conn

    def __exit__(self, exc_type, *_) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


# -- importing -------------------------------------------------------------------------------------
def worst_error(record: dict) -> tuple[float | None, float | None]:
    """(error value, error / threshold) of the record's worst output, or (None, None)."""
    metrics = record.get("metrics") or {}
    found = [m for m in metrics.values() if isinstance(m, dict) and "value" in m]
    if "nmse" in metrics:
        found.append({"value": metrics["nmse"], "threshold": metrics.get("threshold")})
    best: tuple[float, float | None, float | None] | None = None
    for metric in found:
        value = _number(metric.get("value"))
        threshold = _number(metric.get("threshold"))
        ratio = value / threshold if value is not None and threshold else None
        severity = float("inf") if value is None else (ratio if ratio is not None else value)
        if best is None or severity > best[0]:
            best = (severity, value, ratio)
    return (best[1], best[2]) if best else (None, None)


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number  # NaN -> None


def commit_time(sha: str | None, repo: str | Path | None = None) -> str | None:
    """The commit's own date from git, when the current (or given) repository has it."""
    if not sha:
        return None
    try:
        done = subprocess.run(["git", "show", "-s", "--format=%cI", sha], cwd=repo,
                              capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _runs_of(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Records grouped by run id; a case written twice into one run keeps its latest record."""
    runs: dict[str, dict] = {}
    for record in records:
        key = (record["kind"], record["backend"], record.get("device") or "", record["case_id"])
        runs.setdefault(record["run_id"], {})[key] = record
    return {run_id: list(by_case.values()) for run_id, by_case in runs.items()}


def _record_row(run_id: str, record: dict) -> tuple:
    perf = record.get("perf") or {}
    error, ratio = worst_error(record)
    return (run_id, record["kind"], str(record["backend"]), str(record.get("device") or ""),
            str(record["op"]), str(record["case_id"]), record.get("dtype") or None,
            record["status"], record.get("time"), _number(perf.get("median_ns")), error, ratio,
            json.dumps(record, default=str))


def _run_row(run_id: str, records: list[dict], *, commit, branch, source, when) -> tuple:
    times = sorted(r["time"] for r in records if r.get("time"))
    env = dict(records[0].get("env") or {})
    sha = commit or env.get("git_commit")
    return (run_id, sha, branch, times[0] if times else None, times[-1] if times else None,
            source, utc_now(), json.dumps(env, default=str), when(sha))


def import_records(conn: sqlite3.Connection, records: Iterable[dict], *, commit: str | None = None,
                   branch: str | None = None, source: str = "",
                   repo: str | Path | None = None) -> ImportResult:
    """Add every run of ``records`` not yet in the database, all in one transaction."""
    result = ImportResult()
    runs = _runs_of(records)
    times = {}
    with _transaction(conn):
        for run_id, run_records in runs.items():
            if conn.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
                result.skipped.append(run_id)
                continue
            row = _run_row(run_id, run_records, commit=commit, branch=branch, source=source,
                           when=lambda sha: times.setdefault(sha, commit_time(sha, repo)))
            conn.execute("INSERT INTO runs (run_id, commit_sha, branch, started, finished, source,"
                         " imported_at, env, commit_time) VALUES (?,?,?,?,?,?,?,?,?)", row)
            conn.executemany(
                "INSERT INTO records (run_id, kind, backend, device, op, case_id, dtype, status,"
                " time, median_ns, error, error_ratio, record) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [_record_row(run_id, r) for r in run_records])
            result.imported.append(run_id)
            result.records += len(run_records)
    return result


def import_file(db_path: str | Path, results: str | Path, **options) -> ImportResult:
    """Read a results file (store.ResultFileError on bad input) and import it."""
    records = store.read_records(results)  # read it whole first: a bad file imports nothing
    conn = connect(db_path)
    try:
        return import_records(conn, records, source=str(results), **options)
    except sqlite3.DatabaseError as e:
        raise DatabaseError(f"cannot import into {db_path}: {e}") from None
    finally:
        conn.close()
