"""Wall time of the test suite and the scenario matrix, base checkout against this one.

    git worktree add /tmp/speed-base BASE_COMMIT
    PYTHONPATH=. python benchmarks/suite_time.py --base /tmp/speed-base --repeats 3

Runs ``opbench test -j 2 -q`` and ``opbench scenario --matrix -j 2 -q`` with each checkout's
code (``PYTHONPATH``), alternating base and new ``--repeats`` times so a neighbour's load hits
both alike, after one untimed warm-up run each (numba's on-disk kernel cache).  Both runs use
the case tables of the checkout they run: compare checkouts whose tables are the same
(``opbench list`` prints the counts; they are printed here too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "test -j 2": ["test", "-j", "2", "-q"],
    "scenario --matrix -j 2": ["scenario", "--matrix", "-j", "2", "-q"],
}


def timed_run(root: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "opbench", *args], env=env, cwd=root,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def case_count(root: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(root)}
    listing = subprocess.run([sys.executable, "-m", "opbench", "list"], env=env, cwd=root,
                             capture_output=True, text=True, check=False).stdout
    return next((line.strip() for line in listing.splitlines() if line.startswith("total")),
                "?")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=sorted(COMMANDS), help="time one command only")
    args = p.parse_args(argv)
    roots = {"base": args.base.resolve(), "new": Path(__file__).resolve().parents[1]}
    for label, root in roots.items():
        print(f"{label}: {root} ({case_count(root)})", flush=True)
    for name, command in COMMANDS.items():
        if args.only and name != args.only:
            continue
        for root in roots.values():
            timed_run(root, command)  # warm-up: numba compiles or loads its cache
        times: dict[str, list[float]] = {label: [] for label in roots}
        for _ in range(args.repeats):
            for label, root in roots.items():
                times[label].append(timed_run(root, command))
        base, new = (statistics.median(times[k]) for k in ("base", "new"))
        print(f"opbench {name}: base {base:.1f} s, new {new:.1f} s (medians of "
              f"{args.repeats}; new/base {new / base:.2f}; load {os.getloadavg()[0]:.1f})"
              f"\n  base runs {[round(t, 1) for t in times['base']]}"
              f"\n  new runs  {[round(t, 1) for t in times['new']]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
