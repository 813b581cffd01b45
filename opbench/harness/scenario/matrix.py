"""The scenario matrix and running scenarios into result records (in this process, or in the
worker pool with -j N / --isolate)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
import traceback
from collections.abc import Iterator

import numpy as np

from opbench.protocol import Backend

from ..executors import LOCAL, ExecutorChoice, run_items
from ..pool import run_items_inline
from ..records import make_record
from ..registry import backend_label, backend_options, open_backend, parse_ref
from .config import KV_DTYPES, ScenarioSpec, model_config
from .judge import run_scenario, scenario_options
from .splits import SPLITS

TOGGLES = ("rope_cache", "graph_reuse", "evict", "delay")
SCENARIO_OPS = ("matmul", "rms_norm", "add", "write")
MAX_DEVICES = 4
REAL_MODEL = "phi-3.5-mini"  # the matrix's model preset: RoPE with freq_factors and mscale
MROPE_MODEL = "qwen2-vl-7b"  # mrope: ROPE with [4, n] positions and sections
ALIBI_MODEL = "bloom-560m"  # ALiBi: no ROPE, no re-rotation, the attention's bias


def split_devices() -> list[tuple[str, int]]:
    """Every split at devices 1..4 (``none`` runs on one device only)."""
    return [(split, n) for split in SPLITS
            for n in ([1] if split == "none" else range(1, MAX_DEVICES + 1))]


def matrix(seed: int = 0, layers: int = 6, steps: int = 4) -> list[ScenarioSpec]:
    """Every split x devices 1..4 x every toggle with an f32 KV cache; plus, per split, device
    count and delay, the gemma3-1b model (local and global layers differ only in freq_base)
    with the RoPE cache on; plus, per split and device count, an f16 and a bf16 cache with
    eviction on (graph reuse on with bf16): the low-precision caches through KV_ROTATE and the
    eviction decisions, without multiplying the whole matrix by three; plus, per split and device
    count, the phi-3.5-mini preset with eviction on (longrope: freq_factors and an attention
    factor through ROPE and the re-rotation LUT); plus qwen2-vl-7b (mrope) with eviction and
    graph reuse on, per split at 2 devices (none: 1); plus bloom-560m (ALiBi) with eviction on
    at every device count of the splits ALiBi runs on (none, layer; head on one device)."""
    common = dict(layers=layers, steps=steps, seed=seed)
    specs = []
    for split, devices in split_devices():
        for values in itertools.product((False, True), repeat=len(TOGGLES)):
            specs.append(ScenarioSpec(split=split, devices=devices, **common,
                                      **dict(zip(TOGGLES, values))))
    for split, devices in split_devices():
        for delay in (False, True):
            specs.append(ScenarioSpec(split=split, devices=devices, model="gemma3-1b",
                                      delay=delay, **common))
    for split, devices in split_devices():
        for kv_dtype in KV_DTYPES[1:]:
            specs.append(ScenarioSpec(split=split, devices=devices, evict=True,
                                      graph_reuse=kv_dtype == "bf16", kv_dtype=kv_dtype,
                                      **common))
    for split, devices in split_devices():
        specs.append(ScenarioSpec(split=split, devices=devices, evict=True,
                                  model=REAL_MODEL, **common))
    for split, devices in split_devices():
        if devices == (1 if split == "none" else 2):
            specs.append(ScenarioSpec(split=split, devices=devices, evict=True,
                                      graph_reuse=True, model=MROPE_MODEL, **common))
    for split, devices in split_devices():
        if split == "layer" or devices == 1 and split in ("none", "head"):
            specs.append(ScenarioSpec(split=split, devices=devices, evict=True,
                                      model=ALIBI_MODEL, **common))
    return specs


def sweep_prompt_lens(model: str, max_devices: int) -> tuple[int, ...] | None:
    """The prompts of a device sweep up to ``max_devices``: None (the model's own) while its
    shortest prompt has a token per device; else every prompt lengthened by the same number of
    tokens, so the shortest has two per device (zigzag cuts the sequence into two chunks per
    device) and the sequences keep their different lengths.  One set of prompts for every
    device count of the sweep: the error is compared at the same sequences."""
    prompts = model_config(model).prompt_lens
    if min(prompts) >= max_devices:
        return None
    extra = 2 * max_devices - min(prompts)
    return tuple(length + extra for length in prompts)


def unsupported(backend: Backend, spec: ScenarioSpec) -> str | None:
    """Why ``backend`` cannot run ``spec``, or None."""
    rotary = spec.config().rotary  # ALiBi: neither ROPE nor KV_ROTATE
    needed = list(SCENARIO_OPS) + ["attention", "set_rows"] + (["rope"] if rotary else [])
    if spec.evict and rotary:
        needed.append("kv_rotate")
    if spec.split in ("ring", "zigzag", "stripe"):
        needed += ["attn_merge", "get_rows"]
    if spec.devices > 1:
        needed.append("copy_async")
    if spec.graph_reuse:
        needed += ["capture_begin", "capture_end", "replay"]
    if spec.kv_dtype != "f32":
        needed.append("cpy")
    missing = [m for m in needed if not backend.implements(m)]
    return f"{backend.name} does not implement {', '.join(missing)}" if missing else None


def _record_fields(backend_name: str, spec: ScenarioSpec, run_id: str) -> dict:
    """What every record of a scenario carries, whatever became of it: the device field
    too, so an ERROR or CRASH record keys like its baseline's OK record (gate, history)."""
    return dict(kind="scenario", backend=backend_name, op="SCENARIO", case_id=spec.id,
                run_id=run_id, params=spec.as_dict(), dtype=spec.kv_dtype,
                device=f"{spec.devices} device(s)")


def scenario_record(backend_ref: str, spec: ScenarioSpec, run_id: str, engine_cls=None,
                    timed: bool = False) -> dict:
    """Run one scenario on a fresh backend instance and describe it as a result record;
    ``timed``: also a ``perf`` block of the decode steps' times (the prefill step left out)."""
    ref = parse_ref(backend_ref)
    cls = ref.cls
    fields = _record_fields(backend_label(ref), spec, run_id)
    try:
        backend = open_backend(ref, declared_options(cls, scenario_options(spec)))
    except (TypeError, ValueError) as exc:
        return make_record(status="UNSUPPORTED", reason=f"backend options: {exc}", **fields)
    try:
        record = _run_record(backend, spec, fields, engine_cls, timed)
    except BaseException:
        with contextlib.suppress(Exception):
            backend.close()
        raise
    try:
        backend.close()
    except Exception as exc:  # a backend that cannot close is a result too, not a crash
        _note_close_failure(record, exc)
    return record


def _note_close_failure(record: dict, exc: Exception) -> None:
    """The run's record keeps its own outcome; a close() that failed after it is added to its
    errors, and turns a record that found nothing wrong (OK, UNSUPPORTED) into an ERROR."""
    summary = f"close() failed after the run: {type(exc).__name__}: {exc}"
    record["errors"] = [*record["errors"], summary]
    if record["status"] in ("OK", "UNSUPPORTED"):
        record.update(status="ERROR", reason=summary)


def declared_options(cls: type, options: dict) -> dict:
    """The scenario's toggles that ``cls`` takes as options (a backend without a RoPE cache
    runs the rope_cache=off and =on scenarios alike)."""
    names = {option.name for option in cls.OPTIONS}
    return {name: value for name, value in options.items() if name in names}


def specs_for(backend_ref: str, specs: list[ScenarioSpec]) -> list[ScenarioSpec]:
    """The scenarios as ``backend_ref`` runs them: a toggle set in the ref
    (``cpu:rope_cache=off``) replaces the spec's, so ids say what ran (duplicates dropped)."""
    ref = parse_ref(backend_ref)
    values = backend_options(ref)
    fixed = {name: values[name] for name in ("rope_cache", "delay") if name in ref.options}
    unique: dict[str, ScenarioSpec] = {}
    for spec in specs:
        spec = dataclasses.replace(spec, **fixed) if fixed else spec
        unique.setdefault(spec.id, spec)
    return list(unique.values())


def step_perf(step_ns: list[int]) -> dict | None:
    """Median, IQR and samples of the decode steps (step 0, the prefill, is another thing)."""
    decode = step_ns[1:] if len(step_ns) > 1 else step_ns
    if not decode:
        return None
    q1, median, q3 = np.percentile(decode, [25, 50, 75])
    return {"n": len(decode), "median_ns": float(median), "iqr_ns": float(q3 - q1),
            "samples_ns": [int(v) for v in decode], "what": "decode step, readback included"}


def _run_record(backend, spec: ScenarioSpec, fields: dict, engine_cls, timed=False) -> dict:
    why = unsupported(backend, spec)
    if why:
        return make_record(status="UNSUPPORTED", reason=why, **fields)
    start = time.perf_counter()
    try:
        result = run_scenario(backend, spec, engine_cls)
    except Exception as exc:  # a crashing backend is a result, not a crash of the run
        summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        where = traceback.format_exc(limit=-4).splitlines()[1:-1]  # the innermost frames
        return make_record(status="ERROR", reason=summary, errors=[summary, *where],
                           scenario={**spec.as_dict(), "divergence": None}, **fields)
    if result.error:  # a near-tie: the run could not be judged
        return make_record(status="ERROR", reason=result.error, errors=[result.error],
                           scenario={**spec.as_dict(), "divergence": None}, **fields)
    div = result.divergence
    scenario = {**spec.as_dict(), "steps_run": result.steps, "per_step": result.per_step,
                "seconds": round(time.perf_counter() - start, 3),
                "divergence": None if div is None else div.__dict__,
                "step_ns": result.step_ns}
    perf = step_perf(result.step_ns) if timed and result.ok else None
    errors = [div.describe()] if div else []
    return make_record(status="OK" if result.ok else "FAIL", metrics=result.worst, perf=perf,
                       reason=errors[0] if errors else None,  # csv, JUnit and reports read it
                       errors=errors, scenario=scenario, **fields)


class ScenarioWork:
    """Scenarios for the worker pool: each on a fresh backend instance (its options depend on
    the scenario), so a crash or hang in one becomes its CRASH/TIMEOUT record."""

    def __init__(self, backend_ref: str, run_id: str, timed: bool = False) -> None:
        self.backend_ref, self.run_id, self.timed = backend_ref, run_id, timed
        self.backend_name = backend_label(backend_ref)

    def start(self) -> None:
        pass

    def run(self, spec: ScenarioSpec) -> dict:
        return scenario_record(self.backend_ref, spec, self.run_id, timed=self.timed)

    def stop(self) -> None:
        pass

    def lost(self, spec: ScenarioSpec, status: str, reason: str) -> dict:
        return make_record(status=status, reason=reason, errors=[reason],
                           scenario={**spec.as_dict(), "divergence": None},
                           **_record_fields(self.backend_name, spec, self.run_id))


def run_specs(backend_ref: str, specs: list[ScenarioSpec], run_id: str, jobs: int = 1,
              isolate: bool = False, timeout: float | None = None, timed: bool = False,
              executor: ExecutorChoice = LOCAL) -> Iterator[dict]:
    """Records of ``specs``: in this process in spec order, or (``jobs`` > 1 or ``isolate``) in
    workers of ``executor`` (local processes, Ray actors) as they finish, a crashed or hung
    scenario becoming a CRASH or TIMEOUT record while the others go on."""
    work = ScenarioWork(backend_ref, run_id, timed)
    if jobs > 1 or isolate:
        return run_items(executor, work, specs, jobs, timeout)
    return run_items_inline(work, specs)
