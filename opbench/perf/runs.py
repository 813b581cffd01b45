"""Independent runs of one perf table (``opbench perf --repeat R``) merged into one record per
case: ``perf.runs_ns`` keeps each run's samples apart, so the gate can tell run-to-run variance
(process start, memory layout, frequency, neighbours) from a change (``stats.compare_runs``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from opbench.harness.store import record_key

from . import timing
from .calibrate import bounding_ceilings


def merge_runs(runs: Sequence[Sequence[dict]], ceilings: Mapping | None = None
               ) -> list[dict]:
    """One record per case, in the first run's order.  A case that did not time OK in some run
    keeps that run's record (its status and reason, with the run named): a flaky case is a
    finding, not something to average away."""
    by_run = [{record_key(r): r for r in run} for run in runs]
    order = list(dict.fromkeys(record_key(r) for run in runs for r in run))
    return [_merge([run[key] for run in by_run if key in run], len(runs), ceilings)
            for key in order]


def _merge(records: list[dict], repeat: int, ceilings) -> dict:
    not_ok = [(i, r) for i, r in enumerate(records) if r["status"] != "OK"]
    if not_ok:
        i, record = not_ok[0]
        if record["status"] == "UNSUPPORTED":
            return record
        return {**record, "reason": f"run {i + 1} of {repeat}: {record['reason']}"}
    runs_ns = [r["perf"]["samples_ns"] for r in records]
    last = records[-1]
    pooled = np.concatenate([np.asarray(run, dtype=np.float64) for run in runs_ns])
    summary = timing.summarize(pooled)
    perf = {**last["perf"], "samples_ns": [int(x) for x in pooled], "runs_ns": runs_ns,
            "repeat": len(records), **summary}
    perf.pop("anchor_ns", None)
    if all("anchor_ns" in r["perf"] for r in records):
        perf["runs_anchor_ns"] = [r["perf"]["anchor_ns"] for r in records]
    threads = perf.get("ceiling_threads") or 1
    perf.update(timing.throughput(summary["median_ns"], nbytes=perf.get("bytes"),
                                  flops=perf.get("flops"),
                                  ceilings=bounding_ceilings(perf.get("device_ceilings"),
                                                             ceilings, threads)))
    return {**last, "perf": perf}
