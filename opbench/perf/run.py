"""Perf mode: case tables of real model shapes, and the runner that times them.

Perf cases are ordinary ``Case`` objects with the op tables' param names, made by each op's
``OpSpec.perf_cases``, so they go through the same ``OpSpec.make_inputs / outputs / call`` as the
correctness tables and are counted by the op's ``OpSpec.work``; only the shapes differ
(Llama/Qwen/Gemma/Phi-class: prefill 512 tokens, decode against 4k-32k of context, 16-64 MiB
copies).  ``--sizes small`` keeps the structure with tiny shapes (tests, CI, the gate experiment).

Every output is checked for NaN after one untimed call (outputs start poisoned with NaN, so a
kernel that skips work cannot post a fast time), and after timing the output of the timed calls
is judged against the oracle (``timed_output_problem``).
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from opbench.harness.cases import PERF_SIZES, Case, Inputs
from opbench.harness.ops import SPECS, support
from opbench.harness.records import case_record, environment
from opbench.harness.registry import device_label, first_device
from opbench.harness.runner import (
    KnownFailures,
    allocate_output,
    judge_output,
    place,
    references,
)

from . import timing
from .anchor import Anchor
from .calibrate import bounding_ceilings, cpu_count, with_device_ceilings

SIZES = PERF_SIZES
INTERPRETER_REASON = "interpreter mode: timings would measure Python, not the kernel"


# -- case tables and work per call: each op's spec holds its own -----------------------------------
def perf_cases(sizes: str = "full") -> list[Case]:
    """Every op's perf cases of size class ``sizes`` (``OpSpec.perf_cases``)."""
    if sizes not in SIZES:
        raise ValueError(f"sizes={sizes!r}: choose from {', '.join(SIZES)}")
    return [case for spec in SPECS.values() for case in spec.perf_cases(sizes)]


def work(case: Case, inputs: Inputs, outputs: Mapping[str, Any]) -> tuple[int, int]:
    """(bytes read + written, flops) of one call, by the op's work model (``OpSpec.work``)."""
    return SPECS[case.op].work(case, inputs, outputs)


# -- one case on one backend -----------------------------------------------------------------------
@dataclass
class Prepared:
    """A case ready to time on one backend: ``fn`` enqueues the call; ``buffers`` its outputs."""

    case: Case
    fn: Callable[[], None]
    buffers: dict
    nbytes: int
    flops: int
    inputs: Inputs | None = None  # what the last timed call read: its output is judged on it
    args: dict | None = None  # the device arrays ``fn`` passes (fresh inputs replace them)
    threads: int = 1  # of the backend, running at once: picks the ceiling (running_threads)
    #: the device's own ceilings where it is not the host's cores (``Backend.device_ceilings``)
    device_ceilings: dict | None = None


#: ``info()["threads"]`` of a backend that splits its work over whatever CPUs it may run on
FOLLOWS_CPUS = "cpus"


def compute_threads(backend) -> int:
    """Threads a backend needs CPUs for, as its ``info()`` declares them: 1 when it declares
    none, or when it follows the CPUs it is given (``FOLLOWS_CPUS``)."""
    threads = _declared_threads(backend)
    return threads if isinstance(threads, int) and threads > 0 else 1


def running_threads(backend) -> int:
    """Threads of the backend that run at once here: no more than this process's CPUs."""
    cpus = cpu_count()
    if _declared_threads(backend) == FOLLOWS_CPUS:
        return cpus
    return min(compute_threads(backend), cpus)


def _declared_threads(backend):
    try:
        return backend.info().get("threads")
    except Exception:  # info is best effort
        return None


def device_of(backend) -> Any:
    return first_device(backend)


def device_name(backend) -> str:
    return device_label(backend)


def prepare(backend, case: Case, seed: int = 0) -> Prepared:
    """Upload inputs, allocate outputs (NaN-poisoned, as the test runner does) once."""
    spec = SPECS[case.op]
    spec.validate(case)
    inputs = spec.make_inputs(case, np.random.default_rng(case.seed(seed)))
    device = device_of(backend)
    args, buffers = place(backend, spec, case, inputs, device)
    stream = backend.stream(device)
    nbytes, flops = work(case, inputs, {name: buf.spec for name, buf in buffers.items()})
    return Prepared(case, lambda: spec.call(backend, case, args, stream), buffers, nbytes, flops,
                    inputs, args, running_threads(backend), _device_ceilings(backend, device))


def _device_ceilings(backend, device) -> dict | None:
    """The backend's device ceilings: None (the host's) for a backend without the method;
    {} (none known: no fraction) when measuring them failed, as they only label the timing,
    which still counts."""
    declared = getattr(backend, "device_ceilings", None)
    if declared is None:
        return None
    try:
        return declared(device)
    except Exception:
        return {}


def refresh_inputs(backend, prepared: Prepared, rng: np.random.Generator) -> None:
    """New random inputs of the same shapes into the arrays ``fn`` passes (``--fresh-inputs``:
    a backend that caches results by address cannot replay an old answer).  Untimed."""
    spec = SPECS[prepared.case.op]
    inputs = spec.make_inputs(prepared.case, rng)
    device = device_of(backend)
    for name, array in inputs.arrays.items():
        if name not in prepared.buffers:  # an in-place output keeps its buffer: restored below
            prepared.args[name] = backend.to_device(array, device)
    prepared.inputs = inputs
    restore_in_place(backend, prepared)


def in_place(prepared: Prepared) -> list[str]:
    """The outputs that start as an input (KV_ROTATE's cache, SET_ROWS' dst, in-place ROPE)."""
    return [name for name, buf in prepared.buffers.items() if buf.spec.init_from]


def restore_in_place(backend, prepared: Prepared) -> None:
    """Put ``prepared.inputs`` back into the in-place outputs, so the next call starts from
    the state the oracle judges.  Into the same buffers where the backend can ``write`` (a
    backend that answers from a cache keyed on the address still sees its old address),
    else into fresh ones."""
    device = device_of(backend)
    for name in in_place(prepared):
        buf = prepared.buffers[name]
        initial = prepared.inputs.arrays[buf.spec.init_from].reshape(buf.spec.shape)
        if backend.implements("write"):
            backend.write(buf.device_view, initial, backend.stream(device))
            before = buf.host_before.copy()  # what rows the op must not touch are judged on
            before[buf.guard: buf.guard + initial.size] = initial.reshape(-1)
            prepared.buffers[name] = replace(buf, host_before=before)
            continue
        fresh = allocate_output(backend, device, name, buf.spec, prepared.inputs)
        prepared.buffers[name] = fresh
        prepared.args[name] = fresh.device_view
    backend.synchronize(device)  # the copy is done before the next (perhaps timed) call


def output_judged(backend, prepared: Prepared) -> bool:
    return KnownFailures(backend.known_failures()).match(prepared.case.id) is None


def timed_output_problem(backend, prepared: Prepared) -> str | None:
    """Judge what the timed calls left in the outputs against the float64 oracle of the
    inputs they read, as ``opbench test`` judges: a backend that returns stale, cached or
    garbage results while timed gets an ERROR, not a speed.  Known failures are not judged.

    An in-place output (KV_ROTATE's cache) holds the input rotated once per timed call, which
    no one-call oracle describes (and composing the oracle that many times would cost more than
    the timing and drift in low precision); so its input is restored into the buffers and one
    more call -- on the timed buffers, after the timed calls -- is judged."""
    if not output_judged(backend, prepared):
        return None
    spec = SPECS[prepared.case.op]
    device = device_of(backend)
    backend.synchronize(device)
    what = "the output of the timed calls"
    if in_place(prepared):
        restore_in_place(backend, prepared)
        prepared.fn()
        backend.synchronize(device)
        what = "the output of a call on restored inputs after the timed calls"
    expected, low = references(spec, prepared.case, prepared.inputs)
    rows = spec.judged_rows(prepared.case, prepared.inputs)
    for name, buf in prepared.buffers.items():
        _, problems = judge_output(spec, prepared.case, buf, backend.to_host(buf.device_flat),
                                   expected[name], low[name], rows.get(name))
        if problems:
            return f"{what} is wrong: {problems[0]}"
    return None


def nan_problem(backend, prepared: Prepared) -> str | None:
    """Run once untimed; name the first output still holding NaN (a skipped write)."""
    prepared.fn()
    backend.synchronize(device_of(backend))
    for name, buf in prepared.buffers.items():
        values = buf.split(backend.to_host(buf.device_flat))[1].astype(np.float32)
        bad = int(np.count_nonzero(np.isnan(values)))
        if bad:
            return f"{name}: {bad} of {values.size} outputs are NaN after one call"
    return None


@dataclass
class PerfOptions:
    budget_ms: float = timing.DEFAULT_BUDGET_MS
    min_samples: int = timing.DEFAULT_MIN_SAMPLES
    warmup: int = timing.DEFAULT_WARMUP
    cold: bool = False
    seed: int = 0
    #: the machine's calibration (``calibrate.load_ceilings``), or flat ceilings
    ceilings: Mapping[str, Any] | None = None
    #: A/B only: fresh buffers this many times, the budget split between them (see run_ab_case)
    epochs: int = 1
    #: new random inputs before every sample (untimed), see refresh_inputs
    fresh_inputs: bool = False
    #: A/B only: idle this long before each side's batch (``timing.measure_interleaved``)
    settle_ms: float = 0.0


def perf_record(label: str, backend, case: Case, status: str, run_id: str, *,
                reason: str | None = None, perf: dict | None = None, errors=None,
                env: dict | None = None) -> dict:
    return case_record("perf", label, case, status, run_id, device=device_name(backend),
                       reason=reason, perf=perf, errors=errors, env=env)


def refusal(backend, case: Case) -> str | None:
    """Why ``case`` cannot be timed on ``backend``, or None."""
    if backend.is_interpreter:
        return backend.interpreter_reason or INTERPRETER_REASON
    supported = support(backend, case)
    return None if supported is True else str(supported)


def _setup(backend, case: Case, options: PerfOptions) -> tuple[Prepared | None, str | None, list]:
    """(prepared case, None, []) or (None, reason for an ERROR, traceback lines)."""
    try:
        prepared = prepare(backend, case, options.seed)
        problem = nan_problem(backend, prepared)
    except Exception as exc:  # a broken backend gives an ERROR record, the run goes on
        return None, f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=4).splitlines()
    return (None, problem, []) if problem else (prepared, None, [])


def subject_for(backend, prepared: Prepared, options: PerfOptions) -> timing.Subject:
    return timing.backend_subject(backend, prepared.fn, device_of(backend), cold=options.cold)


def block(samples: timing.Samples, prepared: Prepared, options: PerfOptions) -> dict:
    """The record's perf block, against the ceilings for the threads the backend runs, or its
    device's own (kept in the block as ``device_ceilings``, for ``perf --repeat``'s merge)."""
    device = prepared.device_ceilings
    return with_device_ceilings(
        timing.perf_block(samples, nbytes=prepared.nbytes or None, flops=prepared.flops or None,
                          ceilings=bounding_ceilings(device, options.ceilings,
                                                     prepared.threads),
                          cold=options.cold),
        device)


def run_perf_case(backend, case: Case, options: PerfOptions, run_id: str, *,
                  label: str | None = None, env: dict | None = None) -> dict:
    """Time one case on one backend; the record's ``perf`` block keeps every sample."""
    label = label or backend.name
    reason = refusal(backend, case)
    if reason:
        return perf_record(label, backend, case, "UNSUPPORTED", run_id, reason=reason, env=env)
    prepared, problem, errors = _setup(backend, case, options)
    if prepared is None:
        return perf_record(label, backend, case, "ERROR", run_id, reason=problem,
                           errors=errors, env=env)
    subject = subject_for(backend, prepared, options)
    try:
        samples = timing.measure(subject.fn, sync=subject.sync, timer=subject.timer,
                                 flush=_between_samples(backend, prepared, options, subject),
                                 warmup=options.warmup, budget_ms=options.budget_ms,
                                 min_samples=options.min_samples)
        wrong = timed_output_problem(backend, prepared)
    except Exception as exc:
        return perf_record(label, backend, case, "ERROR", run_id,
                           reason=f"{type(exc).__name__}: {exc}", env=env)
    perf = {**block(samples, prepared, options),
            **timing.launch_block(subject.timer),
            "output_judged": output_judged(backend, prepared),
            "fresh_inputs": options.fresh_inputs}
    if wrong:
        return perf_record(label, backend, case, "ERROR", run_id, reason=wrong, env=env)
    return perf_record(label, backend, case, "OK", run_id, env=env, perf=perf)


def _between_samples(backend, prepared: Prepared, options: PerfOptions, subject):
    """The untimed step before each sample: the L2 flush of --cold, new inputs with
    --fresh-inputs, both, or nothing."""
    if not options.fresh_inputs:
        return subject.flush
    rng = np.random.default_rng(prepared.case.seed(options.seed) + 1)

    def step() -> None:
        backend.synchronize(device_of(backend))  # the last call has read its inputs
        refresh_inputs(backend, prepared, rng)
        if subject.flush:
            subject.flush()
    return step


#: how many bytes the cases of one round-robin group may move (their buffers live at once)
ROUND_ROBIN_BYTES = 1 << 30


def run_perf_round_robin(backend, cases: Iterable[Case], options: PerfOptions, run_id: str, *,
                         label: str | None = None, env: dict | None = None) -> list[dict]:
    """Time ``cases`` on ``backend`` a few samples of each in turn (``perf --repeat``'s runs),
    timing the anchor (``anchor.Anchor``) after every host-clocked sample.

    Timed one after another, each case sees the machine of its own few hundred milliseconds; a
    neighbour's burst then shifts one case and not the rest.  In rounds, every case's samples
    spread over the whole run, and with the anchor beside each sample the gate can divide out
    what is left (docs/ci.md).  Cases are prepared in groups moving at most
    ``ROUND_ROBIN_BYTES``; one record per case, in the order given."""
    label = label or backend.name
    anchor = Anchor()
    records: dict[str, dict] = {}
    group: dict[str, tuple[Case, Prepared]] = {}
    for case in cases:
        reason = refusal(backend, case)
        prepared, problem, errors = (None, None, []) if reason else _setup(backend, case, options)
        if reason or prepared is None:
            status = "UNSUPPORTED" if reason else "ERROR"
            records[case.id] = perf_record(label, backend, case, status, run_id,
                                           reason=reason or problem, errors=errors, env=env)
            continue
        held = sum(ready.nbytes for _, ready in group.values())
        if group and held + prepared.nbytes > ROUND_ROBIN_BYTES:
            records.update(_time_group(backend, group, anchor, options, run_id, label, env))
            group = {}
        group[case.id] = (case, prepared)
    records.update(_time_group(backend, group, anchor, options, run_id, label, env))
    return [records[case.id] for case in cases if case.id in records]


def _time_group(backend, group: dict, anchor, options: PerfOptions, run_id: str, label: str,
                env) -> dict[str, dict]:
    if not group:
        return {}
    on_host = device_name(backend).split(":")[0].lower() == "cpu"  # the anchor speaks for it
    subjects = {}
    for name, (_, prepared) in group.items():
        subject = _judged_subject(backend, prepared, options)
        subjects[name] = dataclasses.replace(subject, anchor=anchor) if on_host else subject
    try:
        samples = timing.measure_interleaved(
            subjects, warmup=options.warmup, budget_ms=options.budget_ms,
            min_samples=options.min_samples, seed=options.seed)
    except Exception:  # one case broke the round: time each alone, so its record says which
        cases = [case for case, _ in group.values()]
        group.clear()  # frees the group's buffers before each case is prepared again
        return {case.id: run_perf_case(backend, case, options, run_id, label=label, env=env)
                for case in cases}
    return {name: _timed_record(backend, case, prepared, samples[name], options, run_id,
                                label, env)
            for name, (case, prepared) in group.items()}


def _timed_record(backend, case, prepared, samples, options, run_id, label, env) -> dict:
    try:
        wrong = timed_output_problem(backend, prepared)
    except Exception as exc:
        wrong = f"{type(exc).__name__}: {exc}"
    if wrong:
        return perf_record(label, backend, case, "ERROR", run_id, reason=wrong, env=env)
    perf = {**block(samples, prepared, options), "output_judged": output_judged(backend, prepared),
            "fresh_inputs": options.fresh_inputs, "settle_ms": options.settle_ms}
    return perf_record(label, backend, case, "OK", run_id, env=env, perf=perf)


def run_ab_case(sides: Mapping[str, Any], case: Case, options: PerfOptions, run_id: str,
                envs: Mapping[str, dict] | None = None) -> dict[str, dict]:
    """Time ``case`` on two (or more) labelled backends in interleaved rounds; one record each.
    When either side cannot run the case, neither is timed (a one-sided A/B means nothing).

    The budget is split into ``options.epochs`` epochs, each with freshly allocated buffers
    (the earlier ones are kept alive so the new ones land elsewhere): one allocation can make a
    short op several percent slower for the whole run (cache sets, 4K aliasing), which would
    read as a regression of whichever side drew it; over several epochs it averages out."""
    envs = envs or {}
    failed = {label: ("UNSUPPORTED", reason, []) for label, backend in sides.items()
              if (reason := refusal(backend, case))}
    if failed:
        return _ab_failures(sides, case, run_id, envs, failed)
    epochs = max(1, options.epochs)
    kept: list[dict[str, Prepared]] = []
    taken: dict[str, list] = {label: [] for label in sides}
    for epoch in range(epochs):
        prepared, failed = _prepare_sides(sides, case, options)
        if failed:
            return _ab_failures(sides, case, run_id, envs, failed)
        kept.append(prepared)
        subjects = {label: _judged_subject(sides[label], prepared[label], options)
                    for label in sides}
        samples = timing.measure_interleaved(
            subjects, warmup=options.warmup, budget_ms=options.budget_ms / epochs,
            min_samples=math.ceil(options.min_samples / epochs), seed=options.seed + epoch,
            settle_ms=options.settle_ms)
        for label in sides:
            taken[label].append(samples[label].ns)
    return {label: _ab_record(label, sides[label], case, kept, taken[label], options, run_id,
                              envs.get(label))
            for label in sides}


def _judged_subject(backend, prepared: Prepared, options: PerfOptions) -> timing.Subject:
    """The subject of one A/B side, with new inputs before each sample under --fresh-inputs."""
    subject = subject_for(backend, prepared, options)
    return dataclasses.replace(subject, flush=_between_samples(backend, prepared, options,
                                                               subject))


def _ab_record(label, backend, case, kept, taken, options, run_id, env) -> dict:
    """One side's record: ERROR when the output of its last epoch's timed calls is wrong."""
    return _timed_record(backend, case, kept[-1][label], _merged(taken, options), options,
                         run_id, label, env)


def _prepare_sides(sides, case, options) -> tuple[dict[str, Prepared], dict]:
    prepared, failed = {}, {}
    for label, backend in sides.items():
        ready, problem, errors = _setup(backend, case, options)
        if ready is None:
            failed[label] = ("ERROR", problem, errors)
        else:
            prepared[label] = ready
    return prepared, failed


def _merged(parts: list, options: PerfOptions) -> timing.Samples:
    return timing.Samples(np.concatenate(parts).astype(np.int64), options.warmup,
                          options.budget_ms)


def _ab_failures(sides, case, run_id, envs, failed) -> dict[str, dict]:
    records = {}
    for label, backend in sides.items():
        status, reason, errors = failed.get(
            label, ("UNSUPPORTED", "not timed: the other side of the A/B could not run it", []))
        records[label] = perf_record(label, backend, case, status, run_id, reason=reason,
                                     errors=errors, env=envs.get(label))
    return records


def backend_env(backend) -> dict:
    try:
        info = {"name": backend.name, **backend.info()}
    except Exception as exc:  # info is best effort
        info = {"name": backend.name, "info_error": str(exc)}
    return environment(info)


def ratio_rows(records_a: Iterable[dict], records_b: Iterable[dict], *, threshold: float,
               quantile: float = 0.5, seed: int = 0) -> list[dict]:
    """Per case: B/A ratio of the ``quantile`` of the samples, its bootstrap CI and the verdict
    (stats.compare_samples: A is the base)."""
    from . import stats

    by_case = {r["case_id"]: r for r in records_b}
    rows = []
    for a in records_a:
        b = by_case.get(a["case_id"])
        if not b or not a.get("perf") or not b.get("perf"):
            continue
        c = stats.compare_samples(a["perf"]["samples_ns"], b["perf"]["samples_ns"],
                                  threshold=threshold, quantile=quantile, seed=seed)
        rows.append({"case_id": a["case_id"], "a_ns": a["perf"]["median_ns"],
                     "b_ns": b["perf"]["median_ns"], "ratio": c.ratio, "ci_low": c.ci_low,
                     "ci_high": c.ci_high, "verdict": c.verdict})
    return rows
