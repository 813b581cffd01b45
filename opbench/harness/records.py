"""Result records: the status vocabulary, making and checking a record, run ids, and the
environment a record carries.  Every producer (runner, worker pool, perf, scenarios) makes its
records here; ``store`` writes and reads them as JSON Lines.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import subprocess
import uuid
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
KINDS = ("test", "perf", "scenario")
STATUSES = ("OK", "FAIL", "XFAIL", "XPASS", "UNSUPPORTED", "ERROR", "CRASH", "TIMEOUT")
#: judged and passed (XPASS: a known failure that passed, so its entry is stale)
PASSING = ("OK", "XPASS")
#: judged and failed: a wrong result, an exception, a dead or hung worker
FAILING = ("FAIL", "ERROR", "CRASH", "TIMEOUT")
#: of those, the run (not the kernel's result) went wrong: JUnit <error>, not <failure>
BROKEN = ("ERROR", "CRASH", "TIMEOUT")
#: not judged: the backend cannot run the case, or it is a known failure
NOT_JUDGED = ("XFAIL", "UNSUPPORTED")
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
    "shard": None,  # "I/N" when the run was one shard of a suite (``--shard``)
}


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


#: distributions whose versions every record carries (read from metadata: nothing is imported);
#: CuPy's wheels are named per CUDA major (a CUDA 13 machine has cupy-cuda13x), "cupy" from source
VERSIONED = {"torch": ("torch",), "ggml": ("ggml-python",), "triton": ("triton",),
             "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy")}


def installed_version(*distributions: str) -> str | None:
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def gpu_names() -> list[str]:
    """GPU names from nvidia-smi, [] where there is none (no driver, no tool)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict:
    # computed once per process: git, nvidia-smi and /proc are too slow to ask once per record
    import numpy

    import opbench

    env = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "opbench": opbench.__version__,
        "platform": platform.platform(),
        "machine": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": gpu_names(),
        "git_commit": git_commit(),
    }
    env.update({name: installed_version(*dists) for name, dists in VERSIONED.items()})
    return env


def environment(backend_info: dict | None = None) -> dict:
    """Versions, platform, CPU model, git commit, plus the backend's own ``info()`` dict."""
    env = dict(_static_environment())
    env["backend_info"] = dict(backend_info or {})
    return env


def why(record: dict) -> str:
    """What a record says about its status in one line: the reason (UNSUPPORTED, ERROR, an
    XFAIL's entry), else its errors (a FAIL's first bad values, a scenario's first
    divergence), else ''."""
    if record.get("reason"):
        return str(record["reason"])
    return "; ".join(str(e) for e in record.get("errors") or [])


# -- making and checking ---------------------------------------------------------------------------
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
    shard: str | None = None,
) -> dict:
    """A complete record with the schema version and the current time filled in: every field a
    reader fills in (``DEFAULTS``) is there, so a record reads back exactly as written."""
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
        "shard": shard,
    }
    problem = record_problem(record)
    if problem:
        raise ValueError(f"bad result record for {case_id!r}: {problem}")
    return record


def case_record(kind: str, backend: str, case: Any, status: str, run_id: str, **fields) -> dict:
    """A record about one case (op, id, params and dtype taken from ``case``)."""
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in case.items}
    return make_record(kind=kind, backend=backend, op=case.op, case_id=case.id, status=status,
                       run_id=run_id, params=params, dtype=case.dtype, **fields)


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
    wrong = [name for name in ("kind", "run_id", "backend", "op", "case_id", "status")
             if not isinstance(record[name], str) or not record[name]]
    if wrong:
        return ", ".join(f"{name}={record[name]!r}" for name in wrong) + " must be a non-empty" \
            " string"
    if record["kind"] not in KINDS:
        return f"kind={record['kind']!r} must be one of {', '.join(KINDS)}"
    if record["status"] not in STATUSES:
        return f"status={record['status']!r} must be one of {', '.join(STATUSES)}"
    return None
