"""Timing: warm-up, then timed repetitions until a budget, every sample kept (nanoseconds).

The perf runner builds one ``Subject`` per thing it times (a zero-argument callable that enqueues
the op, the backend's ``synchronize``, optionally the backend's own timer and L2 flush) and calls
``measure`` -- or ``measure_interleaved`` to compare two subjects round by round, which is how an
A/B comparison stays fair on a noisy machine: drift (frequency scaling, a neighbour's job) hits
both sides alike instead of whichever ran second.  ``perf_block`` turns samples into the ``perf``
field of a result record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: a timer runs one call (already including its synchronization) and returns nanoseconds
Timer = Callable[[Callable[[], None]], float]

DEFAULT_WARMUP = 3
DEFAULT_BUDGET_MS = 500.0
DEFAULT_MIN_SAMPLES = 50  # the gate's CI needs ~50 to see 15% through 2-core noise
DEFAULT_MAX_SAMPLES = 10_000  # bounds record size and the gate's bootstrap time


@dataclass
class Subject:
    """What to time: ``fn`` enqueues the work; ``sync`` waits for it.

    ``timer`` (e.g. CUDA events) replaces the default perf_counter_ns clock; ``flush`` (e.g. an
    L2 flush) runs untimed before every sample so each sample starts cold.  ``anchor`` (see
    ``anchor.Anchor``), timed right after every sample into ``anchor_ns``, tells how fast the
    machine was at that moment."""

    fn: Callable[[], None]
    sync: Callable[[], None]
    timer: Timer | None = None
    flush: Callable[[], None] | None = None
    anchor: Callable[[], int] | None = None
    anchor_ns: list[int] = field(default_factory=list)

    def time_once(self) -> float:
        if self.flush is not None:
            self.flush()
            self.sync()
        if self.timer is not None:
            ns = float(self.timer(self.fn))
        else:
            ns = wall_clock_ns(self.fn, self.sync)
        if self.anchor is not None:
            self.anchor_ns.append(self.anchor())
        return ns

    def time_batch(self, samples: int) -> list[float]:
        return [self.time_once() for _ in range(samples)]

    def warm_up(self, calls: int) -> None:
        # a device timer that hides the host's enqueue learns its length from the warm-up
        warm = getattr(self.timer, "warm", None)
        for _ in range(calls):
            if warm is None:
                self.fn()
            else:
                warm(self.fn)
        self.sync()


def backend_subject(backend, fn: Callable[[], None], device=None, *, cold: bool = False) -> Subject:
    """A Subject for ``fn`` on ``backend``: its synchronize, its timer() (None: the host
    clock), and with ``cold=True`` its ``flush_l2()`` before every sample (the protocol's
    default flushes nothing)."""
    timer = backend.timer()
    flush = backend.flush_l2 if cold else None
    return Subject(fn, lambda: backend.synchronize(device), timer, flush)


def wall_clock_ns(fn: Callable[[], None], sync: Callable[[], None]) -> int:
    """The CPU timer: perf_counter_ns around the call *and* its synchronization."""
    start = time.perf_counter_ns()
    fn()
    sync()
    return time.perf_counter_ns() - start


@dataclass
class Samples:
    ns: np.ndarray  # int64, in the order they were taken
    warmup: int
    budget_ms: float
    anchor_ns: np.ndarray | None = None  # the anchor timed right after each sample, if any

    def __len__(self) -> int:
        return len(self.ns)

    def summary(self) -> dict:
        return summarize(self.ns)


def _check_limits(budget_ms: float, min_samples: int, max_samples: int) -> None:
    if budget_ms < 0:
        raise ValueError(f"budget_ms={budget_ms} must be >= 0")
    if min_samples < 1:
        raise ValueError(f"min_samples={min_samples} must be >= 1")
    if max_samples < min_samples:
        raise ValueError(f"max_samples={max_samples} must be >= min_samples={min_samples}")


def measure(
    fn: Callable[[], None],
    *,
    sync: Callable[[], None],
    warmup: int = DEFAULT_WARMUP,
    budget_ms: float = DEFAULT_BUDGET_MS,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    flush: Callable[[], None] | None = None,
    timer: Timer | None = None,
) -> Samples:
    """Warm up, then time ``fn`` until ``budget_ms`` is spent and at least ``min_samples``
    were taken (never more than ``max_samples``)."""
    _check_limits(budget_ms, min_samples, max_samples)
    subject = Subject(fn, sync, timer, flush)
    subject.warm_up(warmup)
    samples: list[float] = []
    deadline = time.perf_counter_ns() + int(budget_ms * 1e6)
    while len(samples) < max_samples:
        samples.append(subject.time_once())
        if len(samples) >= min_samples and time.perf_counter_ns() >= deadline:
            break
    return Samples(np.asarray(samples, dtype=np.int64), warmup, budget_ms)


def measure_interleaved(
    subjects: Mapping[str, Subject],
    *,
    warmup: int = DEFAULT_WARMUP,
    budget_ms: float = DEFAULT_BUDGET_MS,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    per_round: int = 5,
    seed: int = 0,
    settle_ms: float = 0.0,
) -> dict[str, Samples]:
    """Time several subjects in alternating rounds of ``per_round`` samples each, in a seeded
    random order per round; ``budget_ms`` is per subject, like ``measure``'s.  A subject takes
    a round's samples with ``time_batch`` (one request for a subject in a worker process).

    ``settle_ms``: idle this long (untimed, outside the budget) before a subject's batch
    whenever the subject changes, so the threads the previous subject's backend left spinning
    (OpenMP's wait for its next op, our crew's watch) have gone to sleep: on a machine with few
    cores they otherwise hold a core into the next subject's samples, and the side whose
    threads spin longer wins (docs/perf.md, "Eleventh pass").  The idle puts the subject's own
    threads to sleep as well, so ``warmup`` untimed calls follow it, also outside the budget:
    the samples are steady-state, not wake-ups (ggml's ROPE normal, [128, 32, 512] f32, read
    1.96-2.34 ms a call without them and 0.69-0.79 with them, interleaved with cpu; 0.55 alone)."""
    _check_limits(budget_ms, min_samples, max_samples)
    if per_round < 1:
        raise ValueError(f"per_round={per_round} must be >= 1")
    if settle_ms < 0:
        raise ValueError(f"settle_ms={settle_ms} must be >= 0")
    names = list(subjects)
    for name in names:
        subjects[name].warm_up(warmup)
    taken: dict[str, list[float]] = {name: [] for name in names}
    rng = np.random.default_rng(seed)
    deadline = time.perf_counter_ns() + int(budget_ms * 1e6 * len(names))
    previous = None
    while True:
        for index in rng.permutation(len(names)):
            name = names[index]
            if settle_ms and name != previous:
                deadline += (_untimed(time.sleep, settle_ms / 1e3)
                             + _untimed(subjects[name].warm_up, warmup))
            previous, room = name, max_samples - len(taken[name])
            taken[name].extend(subjects[name].time_batch(min(per_round, room)))
        fewest = min(len(v) for v in taken.values())
        if fewest >= max_samples:
            break
        if fewest >= min_samples and time.perf_counter_ns() >= deadline:
            break
    return {  # a batch may overshoot max_samples
        name: Samples(np.asarray(v[:max_samples], dtype=np.int64), warmup, budget_ms,
                      _anchor_samples(subjects[name], len(v[:max_samples])))
        for name, v in taken.items()
    }


def _untimed(step: Callable[[Any], None], argument) -> int:
    """``step(argument)`` (an idle, a re-warm) outside the samples; the nanoseconds it took,
    which extend the deadline."""
    start = time.perf_counter_ns()
    step(argument)
    return time.perf_counter_ns() - start


def _anchor_samples(subject, count: int) -> np.ndarray | None:
    if getattr(subject, "anchor", None) is None:  # a worker's subject (cross --ab) has none
        return None
    return np.asarray(subject.anchor_ns[:count], dtype=np.int64)


# -- statistics of one sample set ------------------------------------------------------------------
def summarize(samples: Samples | np.ndarray | list) -> dict:
    """median, IQR (q3 - q1), quartiles, min, max, mean and count, in nanoseconds."""
    ns = np.asarray(samples.ns if isinstance(samples, Samples) else samples, dtype=np.float64)
    if ns.size == 0:
        raise ValueError("cannot summarize zero samples")
    q1, median, q3 = np.percentile(ns, [25, 50, 75])
    return {
        "n": int(ns.size),
        "median_ns": float(median),
        "iqr_ns": float(q3 - q1),
        "q1_ns": float(q1),
        "q3_ns": float(q3),
        "min_ns": float(ns.min()),
        "max_ns": float(ns.max()),
        "mean_ns": float(ns.mean()),
    }


# -- throughput ----------------------------------------------------------------------------------
def throughput(
    median_ns: float,
    *,
    nbytes: int | None = None,
    flops: int | None = None,
    ceilings: Mapping[str, float] | None = None,
    cold: bool = False,
) -> dict:
    """GB/s and GFLOP/s at ``median_ns`` per call, and the fraction of the ceiling that bounds it.

    The bound is the roofline's: whichever of bytes/bandwidth and flops/peak is the longer
    minimum time.  ``ceilings`` holds ``copy_gbps`` and ``matmul_gflops``, and optionally the
    ``threads`` they are for and the machine's ``llc_bytes`` (see ``calibrate.ceilings_for``).
    A memory-bound call that moves no more than half the last-level cache (the rest holds other
    data: code, other cores' and processes' lines), or beats the copy ceiling while moving no
    more than the cache holds, ran from cache: it is ``cache_resident`` and gets no fraction of
    a memory ceiling it was never bound by -- unless the samples were ``cold`` (the caches
    evicted before each, ``perf --cold``): then every call read from memory.  Any other call
    beyond its ceiling is ``above_ceiling`` (a ceiling measured on a busy machine), also
    without a fraction."""
    if median_ns <= 0:
        raise ValueError(f"median_ns={median_ns} must be > 0")
    seconds = median_ns * 1e-9
    gbps = nbytes / seconds / 1e9 if nbytes else None
    gflops = flops / seconds / 1e9 if flops else None
    bound = _bound(nbytes, flops, ceilings)
    ceiling = fraction = None
    if ceilings and bound is not None:
        ceiling = ceilings.get("copy_gbps" if bound == "memory" else "matmul_gflops")
        achieved = gbps if bound == "memory" else gflops
        if ceiling and achieved is not None:
            fraction = achieved / ceiling
    resident = bound == "memory" and not cold and _cache_resident(nbytes, fraction, ceilings)
    above = not resident and fraction is not None and fraction > 1.0
    return {
        "gbps": gbps,
        "gflops": gflops,
        "bound": bound,
        "ceiling": ceiling,
        "ceiling_threads": (ceilings or {}).get("threads"),
        "fraction_of_ceiling": None if resident or above else fraction,
        "cache_resident": resident,
        "above_ceiling": above,
    }


def _cache_resident(nbytes: int | None, fraction: float | None,
                    ceilings: Mapping[str, float] | None) -> bool:
    llc = (ceilings or {}).get("llc_bytes")
    if not nbytes:
        return False
    if llc and nbytes <= llc / 2:
        return True
    return fraction is not None and fraction > 1.0 and (not llc or nbytes <= llc)


def _bound(nbytes: int | None, flops: int | None, ceilings: Mapping[str, float] | None):
    if not nbytes and not flops:
        return None
    if not flops:
        return "memory"
    if not nbytes:
        return "compute"
    if not ceilings or not ceilings.get("copy_gbps") or not ceilings.get("matmul_gflops"):
        # without a machine balance point, call it memory-bound below ~8 flops/byte (typical)
        return "compute" if flops / nbytes > 8 else "memory"
    memory_time = nbytes / ceilings["copy_gbps"]
    compute_time = flops / ceilings["matmul_gflops"]
    return "memory" if memory_time >= compute_time else "compute"


def launch_block(timer: Timer | None) -> dict:
    """What a device timer saw of the host (``backends.common.event_timer``): the median time
    the host took to enqueue one call (``launch_median_ns``) and how many samples' enqueue
    outlasted the spin meant to hide it (``launch_exposed``: those samples include host time),
    and whether the enqueue waits for the device (``launch_waits_for_device``: nothing can hide
    it).  Empty for a timer that keeps none (the host clock's)."""
    launches = getattr(timer, "launch_ns", None)
    if not launches:
        return {}
    return {"launch_median_ns": float(np.median(launches)),
            "launch_exposed": int(getattr(timer, "exposed", 0)),
            "launch_waits_for_device": bool(getattr(timer, "waits_for_device", False))}


def perf_block(
    samples: Samples,
    *,
    nbytes: int | None = None,
    flops: int | None = None,
    ceilings: Mapping[str, float] | None = None,
    cold: bool = False,
) -> dict:
    """The ``perf`` field of a result record: every sample, its summary and its throughput
    (``cold``: the caches were evicted before every sample)."""
    stats = summarize(samples)
    anchored = {} if samples.anchor_ns is None else {
        "anchor_ns": [int(x) for x in samples.anchor_ns]}
    return {
        "samples_ns": [int(x) for x in samples.ns],
        **anchored,
        **stats,
        "warmup": samples.warmup,
        "budget_ms": samples.budget_ms,
        "bytes": nbytes,
        "flops": flops,
        "cold": cold,
        **throughput(stats["median_ns"], nbytes=nbytes, flops=flops, ceilings=ceilings,
                     cold=cold),
    }
