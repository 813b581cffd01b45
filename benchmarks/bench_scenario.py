"""Decode step time on the cpu backend: graph reuse on vs off, RoPE cache on vs off, side by
side in one run (a benchmark, not a test).

    python benchmarks/bench_scenario.py [--layers 24] [--seqs 4] [--context 1024] [--rounds 15]

One backend per rope_cache value; each prefills ``--seqs`` sequences of ``--context`` tokens
once, then decodes one token per sequence per step.  The four modes run interleaved, round by
round: graph_reuse off (the step is built: buffers allocated, ops validated and enqueued) and on
(the captured step is replayed with new positions, slots and lengths written into its buffers),
on each backend, so every mode sees the same cache sizes and the same machine load.  A step is
timed from the host's first call to the moment its output is ready (enqueue + run +
synchronize); the per-layer read-back the matrix judges with is left out, as a real decoder
reads only its output.  Reports medians, IQRs and the ratio of
medians with a bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opbench.backends.cpu import CpuBackend  # noqa: E402
from opbench.harness.scenario.config import ScenarioSpec, model_config  # noqa: E402
from opbench.harness.scenario.engine import PagedEngine  # noqa: E402
from opbench.harness.scenario.model import make_weights  # noqa: E402
from opbench.harness.scenario.schedule import build_schedule  # noqa: E402
from opbench.perf.stats import ratio_of_medians_ci  # noqa: E402


class TimedEngine(PagedEngine):
    """Reads back only the output, after synchronizing every device; notes when the host was
    done queueing the step (what graph reuse saves is host work)."""

    queued_at = 0

    def read(self, buf, plan, inputs):
        self.queued_at = time.perf_counter_ns()
        self.b.synchronize()
        return None


def make_engine(rope_cache: bool, args):
    cfg = model_config(n_layers=args.layers, prompt_lens=(args.context,) * args.seqs,
                       steps=2 * (args.rounds + args.warmup))
    plans = build_schedule(cfg, evict=False)
    spec = ScenarioSpec(split="none", layers=args.layers, rope_cache=rope_cache)
    backend = CpuBackend(rope_cache=rope_cache)
    engine = TimedEngine(backend, spec, cfg, make_weights(cfg))
    engine.step(plans[0])  # prefill: the 1k context goes into the paged cache
    return engine, iter(plans[1:])


def timed_step(engine, plans, reuse: bool) -> tuple[float, float]:
    """(step time, host time to queue the step) in ms."""
    engine.spec = dataclasses.replace(engine.spec, graph_reuse=reuse)
    plan = next(plans)
    start = time.perf_counter_ns()
    engine.step(plan)
    done = time.perf_counter_ns()
    return (done - start) / 1e6, (engine.queued_at - start) / 1e6


def decode_times(args) -> tuple[dict, dict]:
    """(rope_cache, graph_reuse) -> step times and host queueing times in ms; the four modes
    interleaved."""
    engines = {rope: make_engine(rope, args) for rope in (True, False)}
    times: dict[tuple[bool, bool], list[float]] = {}
    queued: dict[tuple[bool, bool], list[float]] = {}
    try:
        for round_ in range(args.warmup + args.rounds):
            for rope, (engine, plans) in engines.items():
                for reuse in (False, True):
                    elapsed, host = timed_step(engine, plans, reuse)
                    if round_ >= args.warmup:
                        times.setdefault((rope, reuse), []).append(elapsed)
                        queued.setdefault((rope, reuse), []).append(host)
    finally:
        for engine, _ in engines.values():
            engine.b.close()
    return times, queued


def _summary(samples: list[float]) -> str:
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return f"{med:8.2f} ms  (IQR {q1:.2f}-{q3:.2f}, n={len(samples)})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    args = parser.parse_args(argv)
    print(f"cpu backend, split none, L={args.layers}, {args.seqs} sequences x {args.context} "
          f"context, decode 1 token per sequence per step")
    results, queued = decode_times(args)
    for rope in (True, False):
        for reuse in (False, True):
            print(f"  rope_cache={'on ' if rope else 'off'} graph_reuse={'on ' if reuse else 'off'}"
                  f"  step {_summary(results[rope, reuse])}   host queueing "
                  f"{np.median(queued[rope, reuse]):6.2f} ms")
    for rope in (True, False):
        ratio, low, high = ratio_of_medians_ci(results[rope, False], results[rope, True])
        print(f"graph_reuse on/off (rope_cache {'on' if rope else 'off'}): "
              f"{ratio:.3f} [95% CI {low:.3f}-{high:.3f}]")
    for rope in (True, False):
        ratio, low, high = ratio_of_medians_ci(queued[rope, False], queued[rope, True])
        print(f"host queueing, graph_reuse on/off (rope_cache {'on' if rope else 'off'}): "
              f"{ratio:.3f} [95% CI {low:.3f}-{high:.3f}]")
    for reuse in (False, True):
        ratio, low, high = ratio_of_medians_ci(results[False, reuse], results[True, reuse])
        print(f"rope_cache on/off (graph_reuse {'on' if reuse else 'off'}): "
              f"{ratio:.3f} [95% CI {low:.3f}-{high:.3f}]")


if __name__ == "__main__":
    main()
