"""CPU pinning for ``perf --ab`` that is fair to threaded backends.

Both sides run on one CPU set, so they share every disturbance round by round (docs/perf.md),
and the set holds as many CPUs as the more threaded side runs threads: ggml with two threads
pinned to one CPU measured its threads fighting (13x slower), not ggml.  A side that needs more
CPUs than the set can give is refused with the reason instead of timed."""

from __future__ import annotations

import os

from opbench.errors import UsageError
from opbench.perf.run import compute_threads

__all__ = ["compute_threads", "pin_for_ab"]


def _cpus_of(choice: str, allowed: list[int]) -> list[int]:
    try:
        cpus = sorted({int(part) for part in choice.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--pin-cpu {choice!r}: give CPU numbers (e.g. 1 or 0,1), auto or "
                         "none") from None
    outside = [cpu for cpu in cpus if cpu not in allowed]
    if not cpus or outside:
        raise UsageError(f"--pin-cpu {choice}: not this process's CPUs {allowed}")
    return cpus


def pin_for_ab(choice: str | None, threads: dict[str, int]) -> list[int] | None:
    """Pin this process to one CPU set for both sides, with at least as many CPUs as the
    most threaded side; the set, or None with ``--pin-cpu none``."""
    choice = (choice or "auto").strip().lower()
    if choice == "none" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    label, need = max(threads.items(), key=lambda item: item[1])
    cpus = allowed[-need:] if choice == "auto" else _cpus_of(choice, allowed)
    if need > len(cpus) or (choice == "auto" and need > len(allowed)):
        given = len(allowed) if choice == "auto" else len(cpus)
        raise UsageError(f"--ab: {label} computes with {need} threads but gets {given} CPU(s): "
                         "its threads would fight for them and the time would measure that; "
                         "give it fewer threads (e.g. ggml:n_threads=1) or --pin-cpu more CPUs")
    os.sched_setaffinity(0, set(cpus))
    return cpus
