"""Per-step comparison against the oracle, and running one scenario end to end."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np

from .config import DELAY_MAX_MS, TOLERANCE, ModelConfig, ScenarioSpec, ScenarioTolerance
from .engine import Engine, PagedEngine, Readout
from .model import StepResult, Weights, make_weights, run_oracle
from .ring import SequenceEngine
from .schedule import StepPlan, build_schedule
from .splits import SEQUENCE_SPLITS


@dataclass(frozen=True)
class Divergence:
    step: int
    layer: str  # "0".."L-1" or "output"
    device: int
    metric: str
    value: float
    threshold: float

    def describe(self) -> str:
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
               tol: ScenarioTolerance = TOLERANCE) -> tuple[Divergence | None, dict]:
    """The first (layer order, then output) metric over its threshold, and this step's worst."""
    worst: dict = {"nmse": 0.0, "max_rel": 0.0}
    first = None
    pairs = list(zip(readout.result.layers, expected.layers, readout.layer_devices))
    pairs.append((readout.result.output, expected.output, readout.layer_devices[-1]))
    for index, (actual, want, devices) in enumerate(pairs):
        metrics = compare_arrays(actual, want)
        for name in worst:
            worst[name] = max(worst[name], metrics[name])
        bad = [(m, metrics[m], getattr(tol, m)) for m in ("nmse", "max_rel")
               if not metrics[m] <= getattr(tol, m)]
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
    """Weights, schedule and float64 results; shared by every run of the same model."""
    weights = make_weights(cfg)
    plans = build_schedule(cfg, evict)
    return weights, plans, run_oracle(cfg, weights, plans)


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
    worst = {"nmse": 0.0, "max_rel": 0.0}
    step_ns = []
    per_step: list = []
    for plan, want in zip(plans, expected):
        start = time.perf_counter_ns()
        readout = engine.step(plan)  # ends with the copy to the host: the step has finished
        step_ns.append(time.perf_counter_ns() - start)
        divergence, step_worst = judge_step(plan.step, readout, want, tol)
        worst = {k: max(worst[k], step_worst[k]) for k in worst}
        per_step.append({"step": plan.step, **step_worst})
        if divergence:
            return ScenarioResult(spec, divergence, worst, plan.step + 1, step_ns=step_ns,
                                  per_step=per_step)
    return ScenarioResult(spec, None, worst, len(plans), step_ns=step_ns, per_step=per_step)
