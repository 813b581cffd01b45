"""The cpu backend against ggml and torch, before and after, timed interleaved in one run.

    git worktree add /tmp/speed-base BASE_COMMIT      # the code to compare against
    PYTHONPATH=. python benchmarks/perf_compare.py --base /tmp/speed-base --budget-ms 300

For every perf case of ROPE, ATTN, KV_ROTATE, CPY, SET_ROWS and GET_ROWS (``--sizes full``)
four sides run in one process, in interleaved rounds (``opbench perf --ab``'s machinery:
``perf.run.run_ab_case``, seeded random order per round, fresh buffers per epoch): this
checkout's ``cpu``, the base checkout's ``cpu`` (its ``opbench/backends/cpu`` package loaded
under another name, everything else shared), ``ggml`` and ``torch``.  Drift on a shared
machine hits all four alike.  A ratio is the best peer's median time over cpu's (> 1: cpu
faster); "old" uses the base cpu's median from the same rounds.  A memory-bound case that moves
more than the last-level cache holds also shows the share of the machine's copy ceiling
(``opbench calibrate``, for the same threads) cpu and the best peer reach: where both sit near
it, a ratio below 1.0 is the bound, not the kernel.

Threads are equal on every side: the cpu backend splits its kernels over ``NUMBA_NUM_THREADS``
(default: the CPUs this process may use), ggml gets ``n_threads`` and torch
``torch.set_num_threads`` of the same count, and BLAS (the base cpu's matmuls) the same count
through ``OPENBLAS_NUM_THREADS``, set here before NumPy loads.  OpenMP's idle threads (ggml's
and torch's) spin only briefly (``GOMP_SPINCOUNT=10000``), so one side's spin does not take the
cores from the next side's samples for long; and before each side's batch the run idles
``--settle-ms`` (default 20) until no side's threads spin at all (``opbench perf
--settle-ms``; docs/perf.md, "Eleventh pass": on two cores the copies' ratios moved by up to
0.3 with it; 0 turns it off).  ``--repeats N`` runs the whole table N times and ends with each
ratio's median and range: one run's point moves by up to 0.3 on a small shared machine.
``--cold`` evicts the host's caches (twice the last-level cache written) before every sample of
every side, the base's too: each side reads its inputs from memory, whatever the sides before
it left in the cache (without it, a side whose working set outlives the others' batches reads
warm and the rest cold).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

OPS = ("ROPE", "ATTN", "KV_ROTATE", "CPY", "SET_ROWS", "GET_ROWS")
PEERS = ("ggml", "torch")
#: the default idle before each side's batch: GNU OpenMP's idle threads (ggml's, torch's) held
#: 0.88 of a core for the first 10 ms after an op here and nothing after; on two cores an
#: unsettled table times one side's samples against another's spinning threads (docs/perf.md,
#: "Eleventh pass"; each side re-warms after the idle, "Twelfth pass")
SETTLE_MS = 20.0


def _threads() -> int:
    configured = os.environ.get("NUMBA_NUM_THREADS", "")
    return int(configured) if configured.isdigit() else len(os.sched_getaffinity(0))



def load_base_cpu(base_root: Path):
    """The base checkout's CpuBackend class, its package imported as opbench.backends.base_cpu
    (relative imports of shared helpers resolve to this checkout's, which are the same).

    It is loaded from a copy (``base_package_copy``): numba's on-disk cache records the module
    name it compiled under, so kernels cached as base_cpu beside the base's own files made that
    checkout's cpu backend fall back to NumPy when it ran as itself afterwards, and a cache it
    had written made this loader's do the same."""
    package = base_package_copy(base_root / "opbench" / "backends" / "cpu")
    name = "opbench.backends.base_cpu"
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.CpuBackend


def base_package_copy(package: Path) -> Path:
    """A copy of ``package``'s files in a folder named by their contents, under the temporary
    directory: numba's cache there serves every later run of the same base, and no other."""
    import hashlib
    import shutil
    import tempfile

    sources = sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in sources:
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    target = Path(tempfile.gettempdir()) / "opbench-perf-compare" / digest.hexdigest()[:16] / "cpu"
    if not target.exists():  # copied beside it, then renamed: a copy cut short is never used
        partial = target.with_name(f"cpu.partial-{os.getpid()}")
        shutil.copytree(package, partial, ignore=shutil.ignore_patterns("__pycache__"))
        try:
            partial.rename(target)
        except OSError:  # another run renamed its copy first: the same files
            shutil.rmtree(partial)
    return target


def make_sides(base_root: Path | None, cold: bool = False) -> dict:
    import torch

    from opbench.backends.cpu import CpuBackend
    from opbench.backends.ggml_backend import GgmlBackend

    threads = _threads()
    torch.set_num_threads(threads)
    sides = {"cpu": CpuBackend()}
    if base_root is not None:
        sides["cpu-base"] = load_base_cpu(base_root)()
        _warn_if_base_lost_its_jit()
        if cold:  # a base older than the host flush would take its samples warm
            sides["cpu-base"].flush_l2 = sides["cpu"].flush_l2
    sides.update(ggml=GgmlBackend(n_threads=threads), torch=_torch_backend())
    for backend in sides.values():
        backend.devices(1)
    return sides


def _warn_if_base_lost_its_jit() -> None:
    """A base whose numba kernels do not load runs its NumPy paths: its "old" column would then
    compare against code no user of the base ran (seen with a worktree another loader had used
    first, before the base was loaded from a copy).  Say so before the table."""
    from opbench.backends.cpu import jit

    base_jit = sys.modules.get("opbench.backends.base_cpu.jit")
    if base_jit is not None and jit.available() and not base_jit.available():
        print("warning: the base checkout's numba kernels did not load: its column times its "
              f"NumPy paths ({base_jit.load_error() if hasattr(base_jit, 'load_error') else ''})")


def _torch_backend():
    from opbench.harness.registry import backend_class

    return backend_class("torch")()


def measure(sides: dict, budget_ms: float, pattern: str | None,
            settle_ms: float = 0.0, cold: bool = False) -> dict[str, dict[str, float]]:
    """case id -> side -> median ns, every case timed on all sides interleaved."""
    import re

    from opbench.perf.calibrate import load_ceilings
    from opbench.perf.run import PerfOptions, perf_cases, refusal, run_ab_case

    options = PerfOptions(budget_ms=budget_ms, min_samples=10, epochs=2, settle_ms=settle_ms,
                          cold=cold, ceilings=load_ceilings())
    table: dict[str, dict[str, float]] = {}
    for case in perf_cases("full"):
        if case.op not in OPS or (pattern and not re.search(pattern, case.id)):
            continue
        able = {label: b for label, b in sides.items() if refusal(b, case) is None}
        records = run_ab_case(able, case, options, run_id="perf-compare")
        ok = {label: r["perf"] for label, r in records.items() if r["status"] == "OK"}
        table[case.id] = {label: perf["median_ns"] for label, perf in ok.items()}
        shares = {label: perf.get("fraction_of_ceiling") for label, perf in ok.items()
                  if perf.get("bound") == "memory"}
        print(_row(case.id, table[case.id], shares), flush=True)
    return table


def _row(case_id: str, times: dict[str, float], shares: dict[str, float | None]) -> str:
    peers = {p: times[p] for p in PEERS if p in times}
    if "cpu" not in times or not peers:  # no peer has the op: cpu alone, and the old time
        old = f"{times['cpu-base'] / times['cpu']:7.2f}" if "cpu-base" in times else "-"
        cpu = f"{times['cpu'] / 1e3:10.1f}" if "cpu" in times else f"{'-':>10}"
        return f"{cpu} {'(no peer)':>16} {'-':>7} {'-':>7}  {case_id}  new/old speed {old}"
    best = min(peers, key=peers.get)
    old_ratio, new = ratios(times)
    old = f"{old_ratio:7.2f}" if old_ratio is not None else f"{'-':>7}"
    bound = ""
    if shares.get("cpu") and shares.get(best):
        bound = (f"  [copy ceiling: cpu {shares['cpu']:.0%}, {best} {shares[best]:.0%}]")
    return (f"{times['cpu'] / 1e3:10.1f} {best:>5} {peers[best] / 1e3:10.1f} {old} {new:7.2f}"
            f"  {case_id}{bound}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, help="a checkout of the code to compare against")
    p.add_argument("--budget-ms", type=float, default=300.0, help="per side and case")
    p.add_argument("-p", "--pattern", help="only case ids matching this regex")
    p.add_argument("--threads", type=int, help="threads per side (default: the usable CPUs)")
    p.add_argument("--pin-cpu", type=int, help="run every side on this one CPU")
    p.add_argument("--settle-ms", type=float, default=SETTLE_MS,
                   help=f"idle this long before each side's batch (default: {SETTLE_MS:g})")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the whole table this many times and print each ratio's band")
    p.add_argument("--cold", action="store_true",
                   help="evict the host's caches before every sample of every side")
    args = p.parse_args(argv)
    if args.repeats < 1 or not 0 <= args.settle_ms < math.inf:  # NaN and inf too
        p.error("--repeats must be at least 1 and --settle-ms a finite number >= 0")
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})  # threads started from now on inherit it
    if args.threads:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(_threads()))  # before NumPy loads
    # ggml and torch run on GNU OpenMP, whose idle threads spin for 300,000 iterations (some
    # ms) after each op: interleaved, the spin took a core from the next side's samples (a
    # [4096, 8, 128] f32 copy: cpu 3.64 ms after them, 2.52 ms with this; ggml's and torch's
    # own times no slower). 10,000 still bridge a side's own back-to-back samples.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # before torch and ggml load libgomp
    print(f"threads per side: {_threads()}; CPUs {sorted(os.sched_getaffinity(0))}; "
          f"load: {os.getloadavg()[0]:.2f} (1-min average); caches: "
          f"{'evicted before every sample' if args.cold else 'as the sides before left them'}")
    print(f"{'cpu us':>10} {'best peer us':>16} {'old':>7} {'new':>7}  case  (ratio = peer/cpu)")
    sides = make_sides(args.base, args.cold)
    tables = []
    try:
        for repeat in range(args.repeats):
            if args.repeats > 1:
                print(f"-- run {repeat + 1} of {args.repeats}", flush=True)
            tables.append(measure(sides, args.budget_ms, args.pattern, args.settle_ms,
                                  args.cold))
            below = cases_below(tables[-1])
            print(f"load: {os.getloadavg()[0]:.2f}; cases below 1.0: {len(below)} of "
                  f"{len(tables[-1])}", flush=True)
    except KeyboardInterrupt:  # keep the runs that finished
        print("interrupted: the bands below cover the finished runs only")
    finally:
        for backend in sides.values():
            backend.close()
    if len(tables) > 1:
        print_bands(tables)
    return 0


def ratios(times: dict[str, float]) -> tuple[float | None, float | None]:
    """(old, new): the best peer's median time over the base cpu's and over cpu's."""
    peers = [times[p] for p in PEERS if p in times]
    if not peers or "cpu" not in times:
        return None, None
    old = min(peers) / times["cpu-base"] if "cpu-base" in times else None
    return old, min(peers) / times["cpu"]


def cases_below(table: dict[str, dict[str, float]]) -> list[str]:
    """The cases where cpu's median is slower than the best peer's."""
    return [case for case, times in table.items() if (ratios(times)[1] or 1.0) < 1.0]


def bands(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """case -> "old"/"new" -> that ratio in every run that measured it, in run order."""
    out: dict[str, dict[str, list[float]]] = {}
    for table in tables:
        for case, times in table.items():
            for name, value in zip(("old", "new"), ratios(times)):
                if value is not None:
                    out.setdefault(case, {}).setdefault(name, []).append(value)
    return out


def print_bands(tables) -> None:
    """Each ratio's median and range over the runs: on a small shared machine one run's
    ratio moves by up to 0.3, so a case is read by its band, not by one point."""
    import statistics

    def band(values):
        return (f"{statistics.median(values):5.2f} [{min(values):.2f}-{max(values):.2f}]"
                if values else f"{'-':>17}")

    print(f"\nover {len(tables)} runs: ratio median [lowest-highest] (peer/cpu, > 1: cpu faster)")
    print(f"{'old':>17} {'new':>17}  case")
    by_case = bands(tables)
    for case, named in by_case.items():
        print(f"{band(named.get('old', []))} {band(named.get('new', []))}  {case}")
    lows = [case for case, named in by_case.items() if min(named.get("new", [1.0])) < 1.0]
    highs = [case for case, named in by_case.items()
             if statistics.median(named.get("new", [1.0])) < 1.0]
    print(f"cases below 1.0 in some run: {len(lows)}; with their median below 1.0: {len(highs)}")


if __name__ == "__main__":
    sys.exit(main())
