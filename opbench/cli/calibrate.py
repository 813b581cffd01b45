"""Verb ``calibrate``: measure this machine's copy bandwidth and matmul rate (cached)."""

from __future__ import annotations

import argparse
import json

from opbench.errors import UsageError


def register(subparsers, common) -> None:
    _register_calibrate(subparsers)


def _register_calibrate(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="measure this machine's copy bandwidth and matmul rate (cached)",
        description="Measure this machine's ceilings (large-copy GB/s, float32 GEMM GFLOP/s) "
        "once and cache them ($OPBENCH_CACHE_DIR or ~/.cache/opbench/ceilings.json).",
    )
    p.add_argument("--force", action="store_true", help="measure again even if cached")
    p.add_argument("--copy-mib", type=int, default=256, help="copy size (default: %(default)s)")
    p.add_argument("--matmul-n", type=int, default=1024, help="GEMM size (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the ceilings as JSON")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from opbench.perf import calibrate

    if args.copy_mib < 1:
        raise UsageError(f"--copy-mib {args.copy_mib} must be >= 1")
    if args.matmul_n < 64:
        raise UsageError(f"--matmul-n {args.matmul_n} must be >= 64")
    try:
        ceilings = calibrate.calibrate(
            force=args.force, copy_bytes=args.copy_mib * 2**20, matmul_n=args.matmul_n
        )
    except (calibrate.CeilingsError, OSError) as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(ceilings, indent=2, sort_keys=True))
    else:
        print_ceilings(ceilings)
        print(f"cached in {calibrate.cache_path()}")
    return 0


def print_ceilings(ceilings: dict) -> None:
    one, every = ceilings["one_core"], ceilings["all_cores"]
    cores = f"{every['threads']} core{'s' if every['threads'] > 1 else ''}"
    print(f"copy bandwidth: {one['copy_gbps']:.2f} GB/s on 1 core, "
          f"{every['copy_gbps']:.2f} GB/s on {cores} (read + write)")
    print(f"matmul rate:    {one['matmul_gflops']:.2f} GFLOP/s on 1 core, "
          f"{every['matmul_gflops']:.2f} GFLOP/s on {cores} (float32 GEMM)")
    if any(every[rate] < one[rate] for rate in ("copy_gbps", "matmul_gflops")):
        print(f"note: {cores} measured below one core: the machine was busy (perf then uses the"
              " one-core figure); `opbench calibrate --force` when it is quiet")
    if ceilings.get("llc_bytes"):
        print(f"last-level cache: {ceilings['llc_bytes'] / 2**20:g} MiB (perf reports a working"
              " set within half of it cache-resident, and one within all of it that moves"
              " faster than the copy ceiling: only the cache can serve it so)")
