"""Distributed runs, measured (a benchmark, not a test): three figures side by side in one run.

    python benchmarks/bench_distributed.py steps  [--devices 4] [--steps 8]
    python benchmarks/bench_distributed.py shards [--shards 3] [--op ROPE]
    python benchmarks/bench_distributed.py ray    [-j 2]

- steps: decode step time of the scenario model (6 layers, 3 sequences) with every device in
  this process vs every device its own rank (gloo on 127.0.0.1), per split, with the messages
  and bytes each rank sent per step.  The step time is the harness's step: build or replay,
  run, synchronize and read back every layer (the read-back is a broadcast with ranks).
- shards: wall time of each of N shards of one op's full table (one process per shard, run
  one after another so they do not share the cores): slowest over mean.
- ray: the quick tables through the local pool and through a local Ray instance (-j workers
  each), seconds per case and the difference per case (Ray start-up counted separately).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opbench.harness.ops import SPECS  # noqa: E402
from opbench.harness.scenario.config import ScenarioSpec  # noqa: E402


def bench_steps(devices: int, steps: int) -> None:
    from opbench.harness.ranks.driver import in_process_steps
    from opbench.harness.ranks.launch import run_ranks

    specs = [ScenarioSpec(split=split, devices=devices, steps=steps)
             for split in ("layer", "head", "ring", "zigzag", "stripe")]
    start = time.perf_counter()
    records = {r["case_id"]: r for r in run_ranks(specs, "bench", timeout=300)}
    print(f"rank run (start-up included): {time.perf_counter() - start:.1f} s")
    print(f"{'split':8s} {'in-process ms':>14s} {'ranks ms':>9s} {'ratio':>6s} "
          f"{'msgs/rank/step':>15s} {'KiB/rank/step':>14s}  identical")
    for spec in specs:
        local = in_process_steps(spec)[1:]  # decode steps only: step 0 is the prefill
        record = records[spec.id]
        ranked = record["scenario"]["per_step"][1:]
        ms_local = statistics.median(s["seconds"] for s in local) * 1e3
        ms_ranks = statistics.median(s["seconds"] for s in ranked) * 1e3
        sent = [t["sent"] for s in ranked for t in s["messages"]]
        kib = [t["sent_bytes"] / 1024 for s in ranked for t in s["messages"]]
        same = [a["digest"] for a in local] == [b["digest"] for b in ranked]
        print(f"{spec.split:8s} {ms_local:14.2f} {ms_ranks:9.2f} {ms_ranks / ms_local:6.2f} "
              f"{min(sent):>7d}..{max(sent):<7d} {max(kib):14.1f}  {same} ({record['status']})")


def bench_shards(count: int, op: str) -> None:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(1, count + 1):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "opbench", "test", "-o", op, "-q", "--shard",
                            f"{i}/{count}", "--results", f"{tmp}/s{i}.jsonl"], check=True,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        merged = f"{tmp}/all.jsonl"
        subprocess.run([sys.executable, "-m", "opbench", "merge",
                        *[f"{tmp}/s{i}.jsonl" for i in range(1, count + 1)], "-o", merged],
                       check=True)
    sizes = [sum(1 for c in SPECS[op].cases() if shard_holds(c.id, i, count))
             for i in range(1, count + 1)]
    print(f"{op}: cases per shard {sizes}; seconds {[round(t, 1) for t in times]}; "
          f"slowest / mean = {max(times) / statistics.mean(times):.2f}")


def shard_holds(case_id: str, index: int, count: int) -> bool:
    from opbench.harness.shards import Shard

    return Shard(index, count).holds(case_id)


def bench_ray(jobs: int) -> None:
    import ray

    from opbench.harness.executors import ExecutorChoice, run_cases
    from opbench.harness.records import new_run_id

    cases = [c for spec in SPECS.values() for c in spec.quick_cases(seed=0)]
    run_id = new_run_id()
    start = time.perf_counter()
    local = list(run_cases(ExecutorChoice("local"), "cpu", "cpu", {}, cases, 0, run_id, jobs,
                           120))
    t_local = time.perf_counter() - start
    start = time.perf_counter()
    ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    t_init = time.perf_counter() - start
    start = time.perf_counter()
    on_ray = list(run_cases(ExecutorChoice("ray"), "cpu", "cpu", {}, cases, 0, run_id, jobs,
                            120))
    t_ray = time.perf_counter() - start
    ray.shutdown()
    same = ({r["case_id"]: r["status"] for r in local}
            == {r["case_id"]: r["status"] for r in on_ray})
    n = len(cases)
    print(f"{n} quick cases, -j {jobs}: local pool {t_local:.1f} s ({t_local / n * 1e3:.1f} ms/"
          f"case), Ray {t_ray:.1f} s ({t_ray / n * 1e3:.1f} ms/case; ray.init {t_init:.1f} s "
          f"apart); Ray overhead {(t_ray - t_local) / n * 1e3:+.1f} ms/case; same verdicts: "
          f"{same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    steps = sub.add_parser("steps")
    steps.add_argument("--devices", type=int, default=4)
    steps.add_argument("--steps", type=int, default=8)
    shards = sub.add_parser("shards")
    shards.add_argument("--shards", type=int, default=3)
    shards.add_argument("--op", default="ROPE")
    on_ray = sub.add_parser("ray")
    on_ray.add_argument("-j", "--jobs", type=int, default=2)
    args = parser.parse_args()
    if args.what == "steps":
        bench_steps(args.devices, args.steps)
    elif args.what == "shards":
        bench_shards(args.shards, args.op)
    else:
        bench_ray(args.jobs)


if __name__ == "__main__":
    main()
