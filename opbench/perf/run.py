"""Perf mode: case tables of real model shapes, and the runner that times them.

Perf cases are ordinary ``Case`` objects with the op tables' param names, so they go through the
same ``OpSpec.make_inputs / outputs / call`` as the correctness tables; only the shapes differ
(Llama/Qwen/Gemma/Phi-class: prefill 512 tokens, decode against 4k-32k of context, 16-64 MiB
copies).  ``--sizes small`` keeps the structure with tiny shapes (tests, CI, the gate experiment).

Perf does not judge values against the oracle, but every output is checked for NaN after one
untimed call: outputs start poisoned with NaN, so a kernel that skips work cannot post a fast time.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from opbench.harness.cases import Case, Inputs
from opbench.harness.ops import SPECS
from opbench.harness.ops.attn import BLOCK_SIZE, FLAGS, sequence_lengths, window_size
from opbench.harness.registry import device_label, first_device
from opbench.harness.runner import allocate_output
from opbench.harness.store import environment, make_record
from opbench.protocol import numpy_dtype

from . import timing

SIZES = ("full", "small")
INTERPRETER_REASON = "interpreter mode: timings would measure Python, not the kernel"


# -- case tables -----------------------------------------------------------------------------------
def _rope(ne, mode, dtype="f32") -> Case:
    return Case.make("ROPE", type=dtype, ne=list(ne), n_dims=ne[0], mode=mode, fb=1e4, fs=1.0,
                     ef=0.0, af=1.0, ff=False, inv=False)


def _attn(dtype, hs, nh, nkvh, nq, nkv, **flags) -> Case:
    return Case.make("ATTN", type=dtype, hs=list(hs), nh=nh, nkvh=nkvh, nq=nq, nkv=nkv,
                     **{**FLAGS, **flags})


def _kv_rotate(dtype, bs, hs, nkvh, nrot, nblk) -> Case:
    return Case.make("KV_ROTATE", type=dtype, layout="rotate_half", delta="block", bs=bs, hs=hs,
                     nkvh=nkvh, nrot=nrot, nblk=nblk)


def _cpy(src, dst, ne, perm=(0, 1, 2)) -> Case:
    return Case.make("CPY", type_src=src, type=dst, ne=list(ne), perm=list(perm), step=1)


def _get_rows(src, dst, row, nr, nsrc) -> Case:
    return Case.make("GET_ROWS", type=dst, type_src=src, row=list(row), nr=nr, nsrc=nsrc)


def _set_rows(src, dst, row, nr, nslots) -> Case:
    return Case.make("SET_ROWS", type=dst, type_src=src, row=list(row), nr=nr, nslots=nslots,
                     skip=0)


def full_cases() -> list[Case]:
    """Llama-3-8B-like (32 heads, 8 kv heads, head 128), Gemma-2-like (head 256, softcap 50,
    sliding window), decode against 4k/8k/32k of context, 16-64 MiB copies."""
    return [
        _rope((128, 32, 512), "neox"), _rope((128, 32, 512), "normal"),
        _rope((128, 8, 512), "neox"), _rope((128, 32, 512), "neox", "f16"),
        _attn("f32", (128, 128), 32, 8, 512, 512, causal=1),
        _attn("f16", (128, 128), 32, 8, 1, 4096, causal=1),
        _attn("f16", (128, 128), 32, 8, 1, 8192, causal=1),
        _attn("f16", (128, 128), 32, 8, 1, 32768, causal=1),
        _attn("f16", (128, 128), 32, 8, 1, 4096, causal=1, paged=1),
        _attn("f16", (128, 128), 32, 8, 1, 32768, causal=1, paged=1),
        _attn("f32", (256, 256), 16, 8, 512, 512, causal=1, win=1, sc=50.0),
        _kv_rotate("f16", 16, 128, 8, 512, 2048), _kv_rotate("f32", 16, 128, 8, 512, 2048),
        _cpy("f32", "f16", (4096, 8, 128)), _cpy("f32", "f32", (4096, 8, 128)),
        _cpy("f32", "f32", (4096, 8, 128), (1, 0, 2)), _cpy("f32", "f32", (16384, 8, 128)),
        _get_rows("f16", "f32", (8, 128), 4096, 8192),
        _set_rows("f32", "f16", (8, 128), 4096, 16384),
    ]


def small_cases() -> list[Case]:
    """The same ops and variants on tiny shapes: sub-millisecond calls, hundreds of samples."""
    return [
        _rope((64, 4, 16), "neox"), _rope((64, 4, 16), "normal"),
        _attn("f32", (64, 64), 4, 2, 8, 8, causal=1),
        _attn("f16", (64, 64), 4, 2, 1, 64, causal=1, paged=1),
        _attn("f32", (64, 64), 4, 2, 8, 8, causal=1, win=1, sc=50.0),
        _kv_rotate("f32", 16, 64, 2, 4, 8),
        _cpy("f32", "f16", (64, 4, 64)), _cpy("f32", "f32", (64, 4, 64), (1, 0, 2)),
        _get_rows("f16", "f32", (2, 64), 32, 64),
        _set_rows("f32", "f16", (2, 64), 32, 64),
    ]


def perf_cases(sizes: str = "full") -> list[Case]:
    if sizes not in SIZES:
        raise ValueError(f"sizes={sizes!r}: choose from {', '.join(SIZES)}")
    return full_cases() if sizes == "full" else small_cases()


# -- work per call: bytes moved and flops ----------------------------------------------------------
def _itemsize(dtype: str) -> int:
    return numpy_dtype(dtype).itemsize


def _visible_keys(n_q: int, n_kv: int, causal: bool, window: int) -> int:
    """Keys each query attends to, summed over queries (queries sit at the end of the keys)."""
    total = 0
    for i in range(n_q):
        last = n_kv - n_q + i if causal else n_kv - 1
        seen = last + 1
        if window:
            seen = min(seen, window)
        total += max(0, seen)
    return total


def _attn_work(case: Case) -> tuple[int, int]:
    dk, dv = case["hs"]
    heads, kv_heads, size = case["nh"], case["nkvh"], _itemsize(case.dtype)
    seqs = sequence_lengths(case) if case["paged"] else [(case["nkv"], case["nq"])]
    pairs = sum(_visible_keys(q, kv, bool(case["causal"]), window_size(case)) for kv, q in seqs)
    n_q = sum(q for _, q in seqs)
    n_kv = sum(kv for kv, _ in seqs)
    if case["paged"]:  # whole blocks are read
        n_kv = sum(math.ceil(kv / BLOCK_SIZE) * BLOCK_SIZE for kv, _ in seqs)
    nbytes = size * (2 * n_q * heads * dk + n_kv * kv_heads * (dk + dv))
    return nbytes, 2 * pairs * heads * (dk + dv)


def work(case: Case, inputs: Inputs, outputs: Mapping[str, Any]) -> tuple[int, int]:
    """(bytes read + written, flops) of one call: what the op must touch, not what a given
    implementation happens to touch."""
    op = case.op
    if op == "ATTN":
        return _attn_work(case)
    if op == "ROPE":
        x = inputs.arrays["x"]
        return 2 * x.nbytes + inputs.arrays["pos"].nbytes, 3 * x.size  # x*cos - y*sin per value
    if op == "KV_ROTATE":
        rows = case["nrot"] * case["bs"] * case["nkvh"] * case["hs"]
        return 2 * rows * _itemsize(case.dtype), 3 * rows  # only the rotated blocks, in place
    if op == "SET_ROWS":
        src = inputs.arrays["src"]
        return src.nbytes + src.size * _itemsize(case["type"]), 0
    if op == "GET_ROWS":  # only the gathered rows of the table are read
        out = outputs["out"]
        values = int(np.prod(out.shape))
        return values * (_itemsize(case["type_src"]) + _itemsize(out.dtype)), 0
    read = sum(a.nbytes for a in inputs.arrays.values())
    written = sum(int(np.prod(o.shape)) * _itemsize(o.dtype) for o in outputs.values())
    return read + written, 0


# -- one case on one backend -----------------------------------------------------------------------
@dataclass
class Prepared:
    """A case ready to time on one backend: ``fn`` enqueues the call; ``buffers`` its outputs."""

    case: Case
    fn: Callable[[], None]
    buffers: dict
    nbytes: int
    flops: int


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
    args = {name: backend.to_device(arr, device) for name, arr in inputs.arrays.items()}
    out_specs = spec.outputs(case, inputs)
    buffers = {name: allocate_output(backend, device, name, out_spec, inputs)
               for name, out_spec in out_specs.items()}
    args.update({name: buf.device_view for name, buf in buffers.items()})
    stream = backend.stream(device)
    nbytes, flops = work(case, inputs, out_specs)
    return Prepared(case, lambda: spec.call(backend, case, args, stream), buffers, nbytes, flops)


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
    ceilings: Mapping[str, float] | None = None
    #: A/B only: fresh buffers this many times, the budget split between them (see run_ab_case)
    epochs: int = 1


def perf_record(label: str, backend, case: Case, status: str, run_id: str, *,
                reason: str | None = None, perf: dict | None = None, errors=None,
                env: dict | None = None) -> dict:
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in case.items}
    return make_record(kind="perf", backend=label, op=case.op, case_id=case.id, status=status,
                       run_id=run_id, device=device_name(backend), params=params,
                       dtype=case.dtype, reason=reason, perf=perf, errors=errors, env=env)


def refusal(backend, case: Case) -> str | None:
    """Why ``case`` cannot be timed on ``backend``, or None."""
    if backend.is_interpreter:
        return backend.interpreter_reason or INTERPRETER_REASON
    supported = backend.supports(case)
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
    return timing.perf_block(samples, nbytes=prepared.nbytes or None,
                             flops=prepared.flops or None, ceilings=options.ceilings)


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
                                 flush=subject.flush, warmup=options.warmup,
                                 budget_ms=options.budget_ms, min_samples=options.min_samples)
    except Exception as exc:
        return perf_record(label, backend, case, "ERROR", run_id,
                           reason=f"{type(exc).__name__}: {exc}", env=env)
    return perf_record(label, backend, case, "OK", run_id, env=env,
                       perf=block(samples, prepared, options))


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
        subjects = {label: subject_for(sides[label], prepared[label], options) for label in sides}
        samples = timing.measure_interleaved(
            subjects, warmup=options.warmup, budget_ms=options.budget_ms / epochs,
            min_samples=math.ceil(options.min_samples / epochs), seed=options.seed + epoch)
        for label in sides:
            taken[label].append(samples[label].ns)
    return {label: perf_record(label, sides[label], case, "OK", run_id, env=envs.get(label),
                               perf=block(_merged(taken[label], options), kept[0][label],
                                          options))
            for label in sides}


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
