"""How a perf record was timed, read from what the record holds, and whether two records' times
can be compared at all.

``perf --repeat R`` times its cases round-robin, each sample followed by the anchor (a 2 MiB
copy and a sine: docs/perf.md), on the host; a plain ``perf`` (or ``--ab``) run times one case at
a time with nothing between its samples.  The anchor leaves the caches colder and the cases
share them, so the same kernel reads differently: on a 2-core machine a small CPY case's median
was 9.19 us plain and 14.76 us with ``--repeat 3`` (x1.61 from the method alone); on another
loaded run two small CPY cases read 16 and 44 us plain, 13.4 and 28.4 us with ``--repeat 2``.
The number of runs does not change a sample, so ``--repeat 3`` and ``--repeat 25`` compare.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TimingMethod:
    runs: int  # independent runs (perf --repeat R); 1 for a plain or --ab run
    anchored: bool  # the anchor timed after every sample (perf --repeat on the host)

    @property
    def repeated(self) -> bool:
        return self.runs > 1

    def comparable(self, other: TimingMethod) -> bool:
        """Samples taken the same way (the count of runs aside)."""
        return (self.repeated, self.anchored) == (other.repeated, other.anchored)

    def describe(self) -> str:
        """How the record was made, in the options' words."""
        if not self.repeated:
            return "without --repeat"
        anchor = "the anchor after every sample" if self.anchored else "no anchor"
        return f"with --repeat {self.runs} ({anchor})"

    def series_label(self) -> str:
        """The method, with the count of runs left out (it does not change a sample)."""
        if not self.repeated:
            return "one run"
        return "--repeat, anchored" if self.anchored else "--repeat, no anchor"


def timing_method(record: dict) -> TimingMethod | None:
    """The method of a timed record; None for one without samples."""
    perf = record.get("perf") or {}
    if not perf.get("samples_ns"):
        return None
    runs = int(perf.get("repeat") or len(perf.get("runs_ns") or ()) or 1)
    return TimingMethod(runs, bool(perf.get("runs_anchor_ns")))


def rerun_advice(base: TimingMethod, new: TimingMethod) -> str:
    """What to rerun so both sides are timed alike."""
    if base.repeated and not new.repeated:
        return f"rerun NEW with --repeat {base.runs}"
    if new.repeated and not base.repeated:
        return (f"rerun BASE with --repeat {new.runs} (separate invocations are compared by "
                "runs), or NEW without --repeat")
    unanchored = "NEW" if base.anchored else "BASE"  # both repeated, one without the anchor
    return (f"rerun {unanchored} with --repeat {max(base.runs, new.runs)} of an opbench that "
            "times the anchor")
