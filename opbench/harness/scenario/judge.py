"""Per-step comparison against the oracle, and running one scenario end to end."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np

from .config import DELAY_MAX_MS, TOLERANCE, ModelConfig, ScenarioSpec, ScenarioTolerance
from .engine import Engine, PagedEngine, Readout
from .model import StepResult, Weights, make_weights, run_oracle, scheduled_oracle
from .ring import SequenceEngine
from .schedule import ScoreBook, StepPlan
from .splits import SEQUENCE_SPLITS


@dataclass(frozen=True)
class Divergence:
    step: int
    layer: str  # "0".."L-1" or "output"
    device: int
    metric: str
    value: float
    threshold: float
    detail: str = ""  # layer "eviction": what the backend's decision was against the oracle's

    def describe(self) -> str:
        if self.detail:
            return f"first divergence at step {self.step}, {self.layer}: {self.detail}"
        return (f"first divergence at step {self.step}, layer {self.layer}, device {self.device}:"
                f" {self.metric}={self.value:.3g} > {self.threshold:.3g}")


@dataclass
class ScenarioResult:
    spec: ScenarioSpec
    divergence: Divergence | None
    worst: dict = field(default_factory=dict)  # metric -> worst value over steps and layers
    steps: int = 0
    error: str | None = None
    step_ns: list[int] = field(default_factory=list)  # wall time of each step, readback included
    per_step: list = field(default_factory=list)  # per step: {"step", "nmse", "max_rel"}

    @property
    def ok(self) -> bool:
        return self.divergence is None and self.error is None


def compare_arrays(actual: np.ndarray, expected: np.ndarray) -> dict:
    """NMSE, max relative error (to max |expected|) and a NaN count; NaN counts as infinite."""
    nan = int(np.isnan(actual).sum())
    if nan:
        return {"nan": nan, "nmse": np.inf, "max_rel": np.inf}
    diff = actual - expected
    nmse = float((diff ** 2).sum() / max((expected ** 2).sum(), 1e-300))
    max_rel = float(np.abs(diff).max() / max(np.abs(expected).max(), 1e-300))
    return {"nan": 0, "nmse": nmse, "max_rel": max_rel}


def judge_step(step: int, readout: Readout, expected: StepResult,
               tol: ScenarioTolerance = TOLERANCE, low: StepResult | None = None
               ) -> tuple[Divergence | None, dict]:
    """The first (layer order, then output) metric over its threshold, and this step's worst.
    ``low``: the low-precision evaluation of the step (a KV cache in f16 / bf16), whose error
    sets the thresholds (the precision rule)."""
    worst: dict = {"nmse": 0.0, "max_rel": 0.0}
    first = None
    pairs = list(zip(readout.result.layers, expected.layers, readout.layer_devices))
    pairs.append((readout.result.output, expected.output, readout.layer_devices[-1]))
    lows = [None] * len(pairs) if low is None else low.layers + [low.output]
    for index, ((actual, want, devices), low_out) in enumerate(zip(pairs, lows)):
        metrics = compare_arrays(actual, want)
        limits = tol.bounds(None if low_out is None else compare_arrays(low_out, want))
        for name in worst:
            worst[name] = max(worst[name], metrics[name])
        bad = [(m, metrics[m], limits[m]) for m in ("nmse", "max_rel")
               if not metrics[m] <= limits[m]]
        if bad and first is None:
            layer = str(index) if index < len(expected.layers) else "output"
            metric, value, threshold = bad[0]
            if metrics["nan"]:
                metric = f"nan(count={metrics['nan']})"
            first = Divergence(step, layer, _worst_device(actual, want, devices), metric, value,
                               threshold)
    return first, worst


def _worst_device(actual, want, devices) -> int:
    if np.isscalar(devices) or isinstance(devices, (int, np.integer)):
        return int(devices)
    err = np.nan_to_num(np.abs(actual - want), nan=np.inf).max(axis=1)
    return int(np.asarray(devices)[int(np.argmax(err))])


ENGINES: dict[str, type[Engine]] = {
    **{split: PagedEngine for split in ("none", "layer", "head")},
    **{split: SequenceEngine for split in SEQUENCE_SPLITS},
}


@functools.lru_cache(maxsize=16)
def oracle_run(cfg: ModelConfig, evict: bool) -> tuple[Weights, list[StepPlan], list[StepResult]]:
    """Weights, schedule (evictions decided by the oracle's attention) and float64 results;
    shared by every run of the same model."""
    weights = make_weights(cfg)
    plans, results = scheduled_oracle(cfg, weights, evict)
    return weights, plans, results


@functools.lru_cache(maxsize=16)
def low_precision_run(cfg: ModelConfig, evict: bool, kv_dtype: str) -> list[StepResult] | None:
    """The low-precision evaluation along the same schedule (None for an f32 cache)."""
    if kv_dtype == "f32":
        return None
    weights, plans, _ = oracle_run(cfg, evict)
    return run_oracle(cfg, weights, plans, kv_dtype=kv_dtype)


class NearTie(Exception):
    """The backend decided otherwise on an eviction the oracle's scores barely decide: the run
    cannot be judged at this seed (neither a pass nor a backend bug)."""


def check_evictions(book: ScoreBook, plan: StepPlan, mass: list[np.ndarray],
                    tie_margin: float) -> Divergence | None:
    """Add the backend's attention mass to its book; its eviction decision must be the
    oracle's (the schedule both ran).  The engine goes on along the oracle's schedule, so a
    wrong decision shows here and nowhere else."""
    book.add(plan, mass)
    oracle = {e.seq: e for e in plan.evictions}
    for s, cached in enumerate(plan.cache_tokens):
        tokens = [int(t) for t in cached]
        if not np.isfinite(mass[s]).all():
            return _eviction_divergence(plan.step, s, "the attention mass holds NaN or inf")
        decided, _ = book.decide(s, tokens)
        ours = tuple(t for b in decided.evicted_blocks
                     for t in tokens[b * book.cfg.block_size:(b + 1) * book.cfg.block_size])
        theirs = oracle[s].evicted_tokens if s in oracle else ()
        if ours == tuple(theirs):
            continue
        margin = oracle[s].margin if s in oracle else np.inf
        what = f"sequence {s} evicts tokens {list(ours)}, the oracle {list(theirs)}"
        if margin < tie_margin:
            raise NearTie(f"step {plan.step}: {what}, but the oracle's block scores are a "
                          f"near-tie (margin {margin:.2g} < {tie_margin:g}): not judged;"
                          f" try another --seed")
        return _eviction_divergence(plan.step, s, f"{what} (oracle margin {margin:.2g})")
    return None


def _eviction_divergence(step: int, seq: int, detail: str) -> Divergence:
    return Divergence(step, "eviction", 0, "eviction decision", float(seq), 0.0, detail)


def scenario_options(spec: ScenarioSpec) -> dict:
    """The backend options a scenario's toggles set (rope_cache; delay and its seed)."""
    options = {"rope_cache": spec.rope_cache}
    if spec.delay:
        options.update(delay=True, delay_seed=spec.seed, delay_max_ms=DELAY_MAX_MS)
    return options


def run_scenario(backend, spec: ScenarioSpec, engine_cls: type[Engine] | None = None,
                 tol: ScenarioTolerance = TOLERANCE) -> ScenarioResult:
    """Drive ``backend`` (made with ``scenario_options(spec)``) through every step; stop at the
    first divergence (later steps would only repeat it)."""
    cfg = spec.config()
    weights, plans, expected = oracle_run(cfg, spec.evict)
    engine = (engine_cls or ENGINES[spec.split])(backend, spec, cfg, weights)
    engine.collect_mass = spec.evict
    lows = low_precision_run(cfg, spec.evict, spec.kv_dtype) or [None] * len(plans)
    worst = {"nmse": 0.0, "max_rel": 0.0}
    step_ns = []
    per_step: list = []
    book = ScoreBook(cfg)
    for plan, want, low in zip(plans, expected, lows):
        start = time.perf_counter_ns()
        readout = engine.step(plan)  # ends with the copy to the host: the step has finished
        step_ns.append(time.perf_counter_ns() - start)
        divergence, step_worst = judge_step(plan.step, readout, want, tol, low)
        worst = {k: max(worst[k], step_worst[k]) for k in worst}
        per_step.append({"step": plan.step, **step_worst})
        if divergence is None and spec.evict:
            try:
                divergence = check_evictions(book, plan, readout.mass,
                                             tol.tie_margin(spec.kv_dtype))
            except NearTie as tie:
                return ScenarioResult(spec, None, worst, plan.step + 1, error=str(tie),
                                      step_ns=step_ns, per_step=per_step)
        if divergence:
            return ScenarioResult(spec, divergence, worst, plan.step + 1, step_ns=step_ns,
                                  per_step=per_step)
    return ScenarioResult(spec, None, worst, len(plans), step_ns=step_ns, per_step=per_step)
