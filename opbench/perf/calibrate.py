"""This machine's performance ceilings: large-copy bandwidth and float32 GEMM rate.

Measured once and cached as JSON (``$OPBENCH_CACHE_DIR/ceilings.json``, else
``$XDG_CACHE_HOME/opbench`` or ``~/.cache/opbench``), keyed by CPU model so a cache on a shared
home directory serves several machines.  Perf results are reported as a fraction of the ceiling
that bounds them (see ``timing.throughput``).

A ceiling is an upper bound, so each is taken from the *fastest* sample (best of N), not the
median: the median of a noisy machine would make ordinary results look better than possible.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from opbench.harness import records
from opbench.perf import timing

COPY_BYTES = 256 * 2**20
MATMUL_N = 1024
CACHE_FILE = "ceilings.json"


class CeilingsError(Exception):
    """The ceilings cache exists but cannot be used; the message says how to fix it."""


def cache_dir() -> Path:
    if os.environ.get("OPBENCH_CACHE_DIR"):
        return Path(os.environ["OPBENCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "opbench"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def measure_copy_bandwidth(nbytes: int = COPY_BYTES, budget_ms: float = 1000.0) -> float:
    """GB/s of np.copyto on ``nbytes`` buffers, counting the read and the write."""
    if nbytes < 2**20:
        raise ValueError(f"nbytes={nbytes} must be >= 1 MiB to measure memory, not cache")
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)  # touched now, so page faults stay out of the samples
    samples = timing.measure(
        lambda: np.copyto(dst, src), sync=lambda: None, warmup=1, budget_ms=budget_ms,
        min_samples=5,
    )
    return 2 * src.nbytes / samples.ns.min()  # bytes per ns == GB/s


def measure_matmul_rate(n: int = MATMUL_N, budget_ms: float = 1000.0) -> float:
    """GFLOP/s of a float32 n x n GEMM (2 n^3 flops) through NumPy's BLAS."""
    if n < 64:
        raise ValueError(f"n={n} must be >= 64 for a meaningful GEMM rate")
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    b = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    out = np.empty((n, n), dtype=np.float32)
    samples = timing.measure(
        lambda: np.matmul(a, b, out=out), sync=lambda: None, warmup=1, budget_ms=budget_ms,
        min_samples=5,
    )
    return 2 * n**3 / samples.ns.min()  # flops per ns == GFLOP/s


def measure_ceilings(copy_bytes: int = COPY_BYTES, matmul_n: int = MATMUL_N) -> dict:
    return {
        "copy_gbps": measure_copy_bandwidth(copy_bytes),
        "matmul_gflops": measure_matmul_rate(matmul_n),
        "copy_bytes": copy_bytes,
        "matmul_n": matmul_n,
        "measured_at": records.utc_now(),
        "numpy": np.__version__,
    }


def read_cache(path: Path | None = None) -> dict:
    path = path or cache_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CeilingsError(
            f"ceilings cache {path} is unreadable ({e}); run `opbench calibrate --force`"
        ) from None
    if not isinstance(data, dict):
        raise CeilingsError(f"ceilings cache {path} must hold a JSON object; "
                            "run `opbench calibrate --force`")
    return data


def _valid(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and all(isinstance(entry.get(k), (int, float)) and entry[k] > 0
                for k in ("copy_gbps", "matmul_gflops"))
    )


def calibrate(force: bool = False, key: str | None = None, **sizes: int) -> dict:
    """Ceilings for this machine: from the cache, or measured and cached when missing/forced."""
    key = key or records.cpu_model()
    path = cache_path()
    cache = {} if force and not _readable(path) else read_cache(path)
    if not force and _valid(cache.get(key)):
        return cache[key]
    cache[key] = measure_ceilings(**sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return cache[key]


def _readable(path: Path) -> bool:
    try:
        read_cache(path)
    except CeilingsError:
        return False
    return True


def load_ceilings(measure_if_missing: bool = True, key: str | None = None) -> dict | None:
    """The cached ceilings of this machine; measured now if missing (unless told not to)."""
    if measure_if_missing:
        return calibrate(key=key)
    entry = read_cache().get(key or records.cpu_model())
    return entry if _valid(entry) else None
