"""This machine's performance ceilings: large-copy bandwidth and float32 GEMM rate, each on one
core and on all cores.

A ceiling is measured the way the fastest peer reaches it: the copy split over one thread per
CPU, the GEMM through NumPy's BLAS with one thread per CPU; and again with one thread, since a
single-threaded backend cannot use the other cores.  Each runs in a fresh interpreter, because
BLAS reads its thread count from the environment once, when it loads.  Perf results are
reported as a fraction of the ceiling that bounds them, for the threads the backend computes
with (``ceilings_for``, ``timing.throughput``).

Measured once and cached as JSON (``$OPBENCH_CACHE_DIR/ceilings.json``, else
``$XDG_CACHE_HOME/opbench`` or ``~/.cache/opbench``), keyed by CPU model so a cache on a shared
home directory serves several machines.  An entry of an older opbench (one core only) counts
as missing: it is measured again.

A ceiling is an upper bound, so each is taken from the *fastest* sample (best of N), not the
median: the median of a noisy machine would make ordinary results look better than possible.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from opbench.backends.common.host import last_level_cache_bytes
from opbench.backends.common.host import usable_cpus as cpu_count  # the name tests patch
from opbench.harness import records
from opbench.perf import timing

COPY_BYTES = 256 * 2**20
MATMUL_N = 1024
CACHE_FILE = "ceilings.json"
#: how BLAS libraries (OpenBLAS, MKL, BLIS, OpenMP builds) are told their thread count
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                         "BLIS_NUM_THREADS")
RATES = ("copy_gbps", "matmul_gflops")


class CeilingsError(Exception):
    """The ceilings cache exists but cannot be used; the message says how to fix it."""


def cache_dir() -> Path:
    if os.environ.get("OPBENCH_CACHE_DIR"):
        return Path(os.environ["OPBENCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "opbench"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def measure_copy_bandwidth(nbytes: int = COPY_BYTES, budget_ms: float = 1000.0,
                           threads: int = 1) -> float:
    """GB/s of the faster of two copies of ``nbytes`` buffers, counting the read and the
    write, split in ``threads`` parts copied at once (both release the GIL): np.copyto, and
    where numba is there the cpu backend's streaming copy, whose stores skip reading each line
    before filling it (1.4x np.copyto's rate on one core here): the ceiling is what the
    memory can do, not what one way of copying gets from it."""
    if nbytes < 2**20:
        raise ValueError(f"nbytes={nbytes} must be >= 1 MiB to measure memory, not cache")
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)  # touched now, so page faults stay out of the samples
    parts = list(zip(np.array_split(dst, threads), np.array_split(src, threads)))
    best = math.inf
    with ThreadPoolExecutor(threads, thread_name_prefix="opbench-calibrate") as pool:
        for copy_part in ceiling_copies().values():

            def copy(copy_part=copy_part) -> None:
                list(pool.map(lambda part: copy_part(*part), parts))

            samples = timing.measure(copy, sync=lambda: None, warmup=1, budget_ms=budget_ms,
                                     min_samples=5)
            best = min(best, samples.ns.min())
    return 2 * src.nbytes / best  # bytes per ns == GB/s


def ceiling_copies() -> dict:
    """The ways to copy ``(dst, src)`` the copy ceiling is the best of."""
    from opbench.backends.cpu import jit

    copies = {"np.copyto": np.copyto}
    if jit.available():
        copies["streaming"] = lambda dst, src: jit.copy_streaming(src, dst)
    return copies


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


def measure_here(threads: int, copy_bytes: int, matmul_n: int, budget_ms: float) -> dict:
    """Both rates in this process: the copy on ``threads`` threads, the GEMM on as many as
    this process's BLAS was started with."""
    return {"copy_gbps": measure_copy_bandwidth(copy_bytes, budget_ms, threads),
            "matmul_gflops": measure_matmul_rate(matmul_n, budget_ms), "threads": threads}


def measure_with_threads(threads: int, copy_bytes: int = COPY_BYTES, matmul_n: int = MATMUL_N,
                         budget_ms: float = 1000.0) -> dict:
    """``measure_here`` in a fresh interpreter whose BLAS runs ``threads`` threads."""
    env = {**os.environ, **dict.fromkeys(BLAS_THREAD_VARIABLES, str(threads))}
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this opbench
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    code = ("import json, sys; from opbench.perf.calibrate import measure_here; "
            "t, c, n, b = sys.argv[1:]; "
            "print(json.dumps(measure_here(int(t), int(c), int(n), float(b))))")
    argv = [str(threads), str(copy_bytes), str(matmul_n), str(budget_ms)]
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise CeilingsError(f"measuring the ceilings on {threads} thread(s) failed: {last}")
    return json.loads(done.stdout.splitlines()[-1])


def measure_ceilings(copy_bytes: int = COPY_BYTES, matmul_n: int = MATMUL_N) -> dict:
    """One-core and all-core ceilings; the top-level rates are the machine's (the higher of
    the two: a busy machine can measure all cores below one), what an older opbench reads."""
    one = measure_with_threads(1, copy_bytes, matmul_n)
    cpus = cpu_count()
    every = measure_with_threads(cpus, copy_bytes, matmul_n) if cpus > 1 else one
    return {
        **{rate: max(one[rate], every[rate]) for rate in RATES},
        "one_core": one,
        "all_cores": every,
        "llc_bytes": last_level_cache_bytes(),
        "copies": list(ceiling_copies()),  # an entry without it predates the streaming copy
        "copy_bytes": copy_bytes,
        "matmul_n": matmul_n,
        "measured_at": records.utc_now(),
        "numpy": np.__version__,
    }


def ceilings_for(calibration: Mapping | None, threads: int) -> dict | None:
    """The ceilings that bound a backend computing with ``threads`` threads: each thread moves
    or computes at most what one core does, all of them together at most what all cores do
    (and never less than one core: a noisy all-core measurement is no tighter bound).  A flat
    mapping of rates (no per-core figures) is used as it is."""
    if not calibration or "one_core" not in calibration:
        return dict(calibration) if calibration else None
    one, every = calibration["one_core"], calibration["all_cores"]
    threads = max(1, min(threads, every["threads"]))
    bound = {rate: max(one[rate], min(every[rate], threads * one[rate])) for rate in RATES}
    return {**bound, "threads": threads, "llc_bytes": calibration.get("llc_bytes")}


def bounding_ceilings(device_ceilings: Mapping | None, calibration: Mapping | None,
                      threads: int) -> dict | None:
    """The ceilings a backend's record is judged against: its device's own
    (``Backend.device_ceilings``: a GPU's; none at all if it knows none) where it computes
    elsewhere than on this host's cores, else the host's calibrated ones for its threads."""
    if device_ceilings is not None:
        return dict(device_ceilings) or None
    return ceilings_for(calibration, threads)


def with_device_ceilings(perf: dict, device_ceilings: Mapping | None) -> dict:
    """A record's perf block holding the device ceilings it was judged against, if any (what
    ``perf --repeat`` judges the merged samples against again)."""
    return perf if device_ceilings is None else {**perf, "device_ceilings": dict(device_ceilings)}


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


def _rates(entry: object) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(entry.get(k), (int, float)) and entry[k] > 0 for k in RATES)


def _valid(entry: object) -> bool:
    """Rates for one core and for all cores, the copy's the best of the ways to copy (an older
    opbench's entry has one core only, or a copy ceiling of np.copyto alone: a streaming copy
    then reads as faster than the machine)."""
    return (_rates(entry) and _rates(entry.get("one_core")) and _rates(entry.get("all_cores"))
            and isinstance(entry["all_cores"].get("threads"), int) and "copies" in entry)


def stale_entry(key: str | None = None) -> bool:
    """Whether the cache holds this machine's ceilings in an older opbench's form."""
    try:
        entry = read_cache().get(key or records.cpu_model())
    except CeilingsError:
        return False
    return _rates(entry) and not _valid(entry)


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
