"""How often the COPY_ASYNC cases catch the broken copies of the test suite, over run seeds.

    PYTHONPATH=. python benchmarks/copy_async_races.py --seeds 20

Each broken backend of ``tests/backends/test_copy_async_contract.py`` runs the cases of the
COPY_ASYNC table whose check targets its bug (``race`` plus the gated clause it breaks), at
sizes up to ``--max-n`` elements, once per run seed; a case "catches" when its record FAILs.
The contract asks for every one, every time.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "backends"))

from test_copy_async_contract import (  # noqa: E402
    CopyIgnoresSourceQueue,
    DestinationDoesNotWait,
    SynchronizeReturnsEarly,
    SynchronizeWaitsForDeviceZeroOnly,
)

from opbench.harness.ops import SPECS  # noqa: E402
from opbench.harness.runner import run_case  # noqa: E402

TARGETS = {CopyIgnoresSourceQueue: ("source", "race"),
           DestinationDoesNotWait: ("dest_read", "race"),
           SynchronizeReturnsEarly: ("sync",),
           SynchronizeWaitsForDeviceZeroOnly: ("sync",)}


def tally(bug, checks, seeds: int, max_n: int) -> collections.Counter:
    cases = [c for c in SPECS["COPY_ASYNC"].cases() if c["check"] in checks and c["n"] <= max_n]
    counts: collections.Counter = collections.Counter()
    for seed in range(seeds):
        backend = bug()
        try:
            for case in cases:
                counts[case["check"], run_case(backend, case, run_seed=seed)["status"]] += 1
        finally:
            backend.close()
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--max-n", type=int, default=4099, help="largest case size (elements)")
    args = p.parse_args(argv)
    missed = 0
    for bug, checks in TARGETS.items():
        counts = tally(bug, checks, args.seeds, args.max_n)
        for check in checks:
            failed = counts[check, "FAIL"]
            total = sum(n for (c, _), n in counts.items() if c == check)
            missed += total - failed
            print(f"{bug.__name__:36s} {check:9s} caught {failed}/{total}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
