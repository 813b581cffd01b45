"""The regression gate: compare a BASE run's records with a NEW run's.

Fatal: a case that passed and now fails (or a case new in NEW that fails); a case that was
supported and now is not; a perf regression (``stats.compare_samples``: the whole confidence
interval of the NEW/BASE ratio of a sample quantile past the threshold); and what the gate cannot
see -- an empty NEW, a NEW without a backend, device or case that BASE has (``allow_missing``
makes missing cases a warning), any CRASH/TIMEOUT/ERROR record in NEW, and a case the two sides
timed differently (one with ``perf --repeat``, one without: ``method.py``), whose times no
number of runs would make comparable.  Everything else is
listed -- fixed cases, improvements, unchanged, not significant, cases new in NEW -- so a
reviewer sees the whole picture.

Records are matched on (kind, backend, device, case_id).  When a file holds several records of one
case (runs appended to the same file), the last one wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from opbench.harness.records import BROKEN, FAILING, PASSING, why
from opbench.perf import stats
from opbench.perf.method import TimingMethod, timing_method

UNSUPPORTED = "UNSUPPORTED"


class CaseKey(NamedTuple):
    kind: str
    backend: str
    device: str
    case_id: str

    def label(self) -> str:
        where = f"{self.backend}/{self.device}" if self.device else self.backend
        return f"[{self.kind}] {where} {self.case_id}"


@dataclass(frozen=True)
class StatusChange:
    key: CaseKey
    base_status: str
    new_status: str
    reason: str | None


@dataclass(frozen=True)
class PerfChange:
    key: CaseKey
    comparison: stats.Comparison
    base_ns: float  # the compared statistic (comparison.quantile of the samples)
    new_ns: float


@dataclass(frozen=True)
class MethodMismatch:
    """A case both sides timed, but differently (``method.TimingMethod``): not compared."""
    key: CaseKey
    base_method: TimingMethod
    new_method: TimingMethod


@dataclass
class GateResult:
    threshold: float
    confidence: float
    quantile: float = stats.DEFAULT_QUANTILE
    newly_failing: list[StatusChange] = field(default_factory=list)
    newly_unsupported: list[StatusChange] = field(default_factory=list)
    fixed: list[StatusChange] = field(default_factory=list)
    other_status_changes: list[StatusChange] = field(default_factory=list)
    regressions: list[PerfChange] = field(default_factory=list)
    improvements: list[PerfChange] = field(default_factory=list)
    unchanged: list[PerfChange] = field(default_factory=list)
    not_significant: list[PerfChange] = field(default_factory=list)
    ambiguous: list[PerfChange] = field(default_factory=list)  # needs more runs to tell
    timed_differently: list[MethodMismatch] = field(default_factory=list)  # not comparable
    missing: list[CaseKey] = field(default_factory=list)
    new_cases: list[CaseKey] = field(default_factory=list)
    compared: int = 0
    new_empty: bool = False
    allow_missing: bool = False
    missing_backends: list[tuple[str, str]] = field(default_factory=list)  # (kind, backend)
    extra_backends: list[tuple[str, str]] = field(default_factory=list)  # NEW's, not in BASE
    missing_devices: list[tuple[str, str, str]] = field(default_factory=list)
    #: backend names both sides have records of (of some kind): a gap of one of them is a kind
    backends_on_both: list[str] = field(default_factory=list)
    broken: list[StatusChange] = field(default_factory=list)  # CRASH/TIMEOUT/ERROR in NEW

    @property
    def missing_cases(self) -> list[CaseKey]:
        """Missing cases whose backend and device NEW does have (the others are counted in
        ``missing_backends`` / ``missing_devices``)."""
        gone_backends, gone_devices = set(self.missing_backends), set(self.missing_devices)
        return [k for k in self.missing if (k.kind, k.backend) not in gone_backends
                and (k.kind, k.backend, k.device) not in gone_devices]

    @property
    def incomplete(self) -> bool:
        """NEW cannot stand in for BASE: the gate would judge what it did not see."""
        return bool(self.new_empty or self.missing_backends or self.missing_devices
                    or (self.missing_cases and not self.allow_missing))

    @property
    def failed(self) -> bool:
        return bool(self.newly_failing or self.newly_unsupported or self.regressions
                    or self.broken or self.incomplete or self.timed_differently)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def case_key(record: dict) -> CaseKey:
    return CaseKey(
        record["kind"], record["backend"], record.get("device") or "", record["case_id"]
    )


def latest_by_case(records: Iterable[dict]) -> dict[CaseKey, dict]:
    by_case: dict[CaseKey, dict] = {}
    for record in records:
        by_case[case_key(record)] = record  # later records supersede earlier ones
    return by_case


def perf_samples(record: dict) -> list | None:
    perf = record.get("perf") or {}
    samples = perf.get("samples_ns")
    return samples if samples else None


def _status_change(key: CaseKey, base: dict, new: dict) -> tuple[str, StatusChange] | None:
    before, after = base["status"], new["status"]
    if before == after:
        return None
    change = StatusChange(key, before, after, why(new))
    if before in PASSING and after in FAILING:
        return "newly_failing", change
    if before != UNSUPPORTED and after == UNSUPPORTED:
        return "newly_unsupported", change
    if before in FAILING and after in PASSING:
        return "fixed", change
    return "other_status_changes", change


def perf_runs(record: dict) -> list[list]:
    """The samples of each independent run (``perf --repeat``); one run for older records."""
    perf = record.get("perf") or {}
    return perf.get("runs_ns") or [perf.get("samples_ns") or []]


def _compare(base: dict, new: dict, options: dict) -> stats.Comparison:
    """Samples of one interleaved process (``perf --ab``) share every run-to-run shift: compare
    them directly.  Separate invocations differ by more than their samples show: compare runs
    (``stats.compare_runs``), and a change the runs cannot back is AMBIGUOUS."""
    base_runs, new_runs = perf_runs(base), perf_runs(new)
    one_process = base["run_id"] == new["run_id"] and len(base_runs) == len(new_runs) == 1
    if one_process:
        return stats.compare_samples(perf_samples(base), perf_samples(new), **options)
    quantile = options.get("quantile", stats.DEFAULT_QUANTILE)
    base_anchored = stats.anchored_runs(base_runs, base["perf"].get("runs_anchor_ns"), quantile)
    new_anchored = stats.anchored_runs(new_runs, new["perf"].get("runs_anchor_ns"), quantile)
    if base_anchored is None or new_anchored is None:
        return stats.compare_runs(base_runs, new_runs, **options)
    return dataclasses.replace(stats.compare_runs(base_anchored, new_anchored, **options),
                               anchored=True)


def _perf_change(key: CaseKey, base: dict, new: dict, options: dict
                 ) -> PerfChange | MethodMismatch | None:
    base_samples, new_samples = perf_samples(base), perf_samples(new)
    if base_samples is None or new_samples is None:
        return None
    if base["status"] in FAILING or new["status"] in FAILING:
        return None  # a failed run's timing means nothing
    base_method, new_method = timing_method(base), timing_method(new)
    if not base_method.comparable(new_method):
        return MethodMismatch(key, base_method, new_method)  # the method alone moves times
    comparison = _compare(base, new, options)
    quantile = comparison.quantile
    return PerfChange(
        key,
        comparison,
        float(np.quantile(base_samples, quantile)),
        float(np.quantile(new_samples, quantile)),
    )


def _coverage_gaps(base: dict[CaseKey, dict], new: dict[CaseKey, dict], result) -> None:
    """Backends of BASE that NEW lacks entirely (and NEW's that BASE lacks: differently named
    sides compare nothing), then devices of backends NEW does have."""
    base_backends = {(k.kind, k.backend) for k in base}
    new_backends = {(k.kind, k.backend) for k in new}
    new_devices = {(k.kind, k.backend, k.device) for k in new}
    result.missing_backends = sorted(base_backends - new_backends)
    result.extra_backends = sorted(new_backends - base_backends)
    result.backends_on_both = sorted({b for _, b in base_backends} & {b for _, b in new_backends})
    result.missing_devices = sorted(
        d for d in {(k.kind, k.backend, k.device) for k in base} - new_devices
        if (d[0], d[1]) in new_backends
    )


def _broken_and_new_failures(base: dict[CaseKey, dict], new: dict[CaseKey, dict],
                             result) -> None:
    """CRASH/TIMEOUT/ERROR anywhere in NEW, and cases new in NEW that fail."""
    for key, record in sorted(new.items()):
        status = record["status"]
        before = base[key]["status"] if key in base else "absent"
        if status in BROKEN:
            result.broken.append(StatusChange(key, before, status, why(record)))
        elif status in FAILING and key not in base:
            result.newly_failing.append(StatusChange(key, before, status, why(record)))


_PERF_LISTS = {
    stats.REGRESSION: "regressions",
    stats.IMPROVEMENT: "improvements",
    stats.UNCHANGED: "unchanged",
    stats.NOT_SIGNIFICANT: "not_significant",
    stats.AMBIGUOUS: "ambiguous",
}


def gate(
    base_records: Iterable[dict],
    new_records: Iterable[dict],
    threshold: float = stats.DEFAULT_THRESHOLD,
    *,
    confidence: float = stats.DEFAULT_CONFIDENCE,
    alpha: float = stats.DEFAULT_ALPHA,
    quantile: float = stats.DEFAULT_QUANTILE,
    seed: int = 0,
    allow_missing: bool = False,
) -> GateResult:
    """Classify every case of BASE and NEW; ``result.exit_code`` is what the CLI returns."""
    if threshold < 0:
        raise ValueError(f"threshold={threshold} must be >= 0")
    base, new = latest_by_case(base_records), latest_by_case(new_records)
    result = GateResult(threshold=threshold, confidence=confidence, quantile=quantile,
                        new_empty=not new, allow_missing=allow_missing)
    options = dict(
        threshold=threshold, confidence=confidence, alpha=alpha, quantile=quantile, seed=seed
    )
    result.missing = sorted(set(base) - set(new))
    result.new_cases = sorted(set(new) - set(base))
    _coverage_gaps(base, new, result)
    _broken_and_new_failures(base, new, result)
    for key in sorted(set(base) & set(new)):
        result.compared += 1
        change = _status_change(key, base[key], new[key])
        if change is not None:
            getattr(result, change[0]).append(change[1])
        perf = _perf_change(key, base[key], new[key], options)
        if isinstance(perf, MethodMismatch):
            result.timed_differently.append(perf)
        elif perf is not None:
            getattr(result, _PERF_LISTS[perf.comparison.verdict]).append(perf)
    result.regressions.sort(key=lambda c: -c.comparison.ratio)
    result.improvements.sort(key=lambda c: c.comparison.ratio)
    return result


def pair_backends(
    base_records: Iterable[dict], new_records: Iterable[dict], base_backend: str, new_backend: str
) -> tuple[list[dict], list[dict]]:
    """Compare backend ``base_backend`` of BASE with ``new_backend`` of NEW (e.g. both halves of
    one interleaved ``perf --ab`` file): keep only those records and give both sides one label
    so their cases match."""
    label = f"{base_backend} vs {new_backend}"
    picked = []
    for records, name, side in ((base_records, base_backend, "BASE"),
                                (new_records, new_backend, "NEW")):
        chosen = [{**r, "backend": label} for r in records if r["backend"] == name]
        if not chosen:
            raise ValueError(f"{side} has no records of backend {name!r}")
        picked.append(chosen)
    return picked[0], picked[1]


def parse_threshold(text: str) -> float:
    """'5%' or '0.05' -> 0.05.  A bare number >= 1 is ambiguous ('5' -> 5% or 500%?): rejected."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100
        else:
            value = float(raw)
            if value >= 1:
                raise ValueError
    except ValueError:
        raise ValueError(
            f"threshold {text!r} must be a percentage like 5% or a fraction like 0.05"
        ) from None
    if not 0 <= value < 10:
        raise ValueError(f"threshold {text!r} must be between 0% and 1000%")
    return value
