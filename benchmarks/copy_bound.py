"""How close the memory-bound copy comes to the machine's copy ceiling, and what the ceiling's
own copy reaches when it is timed the way the op is.

    PYTHONPATH=. python benchmarks/copy_bound.py --budget-ms 3000

The calibrated ceiling (``opbench calibrate``) is the *best* sample of a copy split over the
cores (the faster of ``np.copyto`` and the streaming copy), because a ceiling is an upper bound.
A perf line reports an op's *median* against it.  On a machine whose memory bandwidth swings
from sample to sample (a VM shared with others), the median of the ceiling's own copy sits
well below its best: no op can then reach more of the ceiling than that copy does.  This
script times, interleaved in one process on the op's buffers, the cpu backend's
CPY f32 [16384, 8, 128] (64 MiB, past the last-level cache) through its timer and the
ceiling's two copies split over the cores as the calibration splits them (``--cold``: the
host's caches evicted before every sample of each), and prints each one's median and best as
GB/s and as a share of the calibrated all-core ceiling.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from opbench.backends.common.host import flush_host_caches, usable_cpus
from opbench.harness import runner
from opbench.harness.registry import open_backend
from opbench.perf import timing
from opbench.perf.calibrate import ceiling_copies, load_ceilings

CASE_ID = "CPY(type_src=f32,type=f32,ne=[16384,8,128],perm=[0,1,2],step=1)"


def op_subject(backend, cold: bool) -> tuple[timing.Subject, int]:
    """The cpu backend's CPY as perf times it: its call and synchronize through its timer;
    the bytes it moves (read and write)."""
    from opbench.perf.run import perf_cases

    case = next(c for c in perf_cases("full") if c.id == CASE_ID)
    spec = runner.SPECS[case.op]
    inputs = spec.make_inputs(case, np.random.default_rng(case.seed(0)))
    device = backend.devices(1)[0]
    args, _ = runner.place(backend, spec, case, inputs, device)
    stream = backend.stream(device)
    subject = timing.backend_subject(backend, lambda: spec.call(backend, case, args, stream),
                                     device, cold=cold)
    return subject, 2 * inputs.arrays["src"].nbytes


def split_copy_subject(copy_part, nbytes: int, pool: ThreadPoolExecutor, threads: int,
                       cold: bool) -> timing.Subject:
    """``copy_part(dst, src)`` over ``threads`` parts at once, as the calibration copies."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)  # touched now: no page faults in the samples
    parts = list(zip(np.array_split(dst, threads), np.array_split(src, threads)))

    def copy() -> None:
        list(pool.map(lambda part: copy_part(*part), parts))

    return timing.Subject(copy, lambda: None, flush=flush_host_caches if cold else None)


def report(samples: dict[str, timing.Samples], nbytes: int, ceiling: float) -> list[str]:
    """One line per subject: samples, median and best GB/s, each as a share of ``ceiling``."""
    lines = [f"  {'subject':32s} {'n':>4s} {'median GB/s':>11s} {'best GB/s':>9s} "
             f"{'median/ceiling':>14s} {'best/ceiling':>12s}"]
    for name, taken in samples.items():
        median, best = nbytes / np.median(taken.ns), nbytes / taken.ns.min()
        lines.append(f"  {name:32s} {len(taken):4d} {median:11.1f} {best:9.1f} "
                     f"{median / ceiling:14.0%} {best / ceiling:12.0%}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-ms", type=float, default=3000.0, help="time per subject")
    p.add_argument("--min-samples", type=int, default=20, help="samples per subject at least")
    p.add_argument("--cold", action="store_true",
                   help="evict the host's caches before every sample of every subject")
    args = p.parse_args(argv)
    ceilings = load_ceilings()
    ceiling = ceilings["all_cores"]["copy_gbps"]
    threads = usable_cpus()
    backend = open_backend("cpu")
    try:
        op, nbytes = op_subject(backend, args.cold)
        copies = {f"{name} copy, split": copy for name, copy in ceiling_copies().items()}
        with ThreadPoolExecutor(threads, thread_name_prefix="copy-bound") as pool:
            subjects = {"cpu backend CPY (perf's timer)": op}
            subjects.update({name: split_copy_subject(copy, nbytes // 2, pool, threads,
                                                      args.cold)
                             for name, copy in copies.items()})
            samples = timing.measure_interleaved(subjects, budget_ms=args.budget_ms,
                                                 min_samples=args.min_samples,
                                                 max_samples=max(400, args.min_samples))
    finally:
        backend.close()
    print(f"{CASE_ID}: {nbytes / 2**20:.0f} MiB moved a call (read + write), {threads} "
          f"threads; calibrated all-core copy ceiling {ceiling:.1f} GB/s (best sample, "
          f"{ceilings.get('measured_at', '?')}); caches "
          f"{'evicted before every sample' if args.cold else 'as the subjects left them'}; "
          f"load {os.getloadavg()[0]:.1f}")
    print("\n".join(report(samples, nbytes, ceiling)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
