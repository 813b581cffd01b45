"""Verb ``scenario``: multi-device, stateful decode scenarios judged at every step."""

from __future__ import annotations

from opbench.errors import UsageError
from opbench.harness.records import environment, new_run_id
from opbench.harness.registry import backend_class
from opbench.harness.scenario.config import ScenarioSpec
from opbench.harness.scenario.matrix import matrix, run_specs, specs_for
from opbench.harness.scenario.splits import SPLITS

from . import output
from .common import (
    add_allow_unavailable,
    check_timeout,
    compile_pattern,
    isolated,
    isolation_options,
    open_writer,
    parse_backends,
    probe_backend,
    record_backend_run,
    refuse_unused,
    report_unavailable,
)

EPILOG = """examples:
  opbench scenario --split layer --devices 3 --evict on
  opbench scenario --split zigzag --devices 4 --graph-reuse on --delay on --steps 6
  opbench scenario --matrix -j 2 --results runs/scenarios.jsonl
  opbench scenario --matrix -p 'split=zigzag.*evict=on'
  opbench scenario --matrix -j 2 --timeout 120 -b my_backend.py:Mine  (a crash or hang of one
      scenario becomes its CRASH/TIMEOUT record; the others go on)
exit codes: 0 every step matched the float64 oracle, 1 a divergence (the first diverging step,
layer, device and metric are printed), 2 a usage error"""


def _on_off(value: str) -> bool:
    return value == "on"


def register(subparsers, common) -> None:
    import argparse

    parser = subparsers.add_parser(
        "scenario", parents=[common], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="decode loop through a small transformer over devices, caches and graphs, judged"
             " at every step against a float64 model")
    parser.add_argument("--split", choices=SPLITS, default="none",
                        help="how the model is split over --devices (default: none)")
    parser.add_argument("--layers", type=int, default=6, help="transformer layers (default 6)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps after the prefill"
                        " (default 4)")
    parser.add_argument("--model", choices=["gemma3", "gemma3-1b"], default="gemma3",
                        help="per-layer RoPE pattern (default gemma3: global layers scaled x8)")
    for toggle, default, what in (("rope-cache", "on", "the backend's sin/cos cache"),
                                  ("graph-reuse", "off", "build the decode step once, replay it"),
                                  ("evict", "off", "KV eviction + key re-rotation"),
                                  ("delay", "off", "random stream delays (fault injection)")):
        parser.add_argument(f"--{toggle}", choices=["on", "off"], default=default,
                            help=f"{what} (default {default})")
    parser.add_argument("--matrix", action="store_true",
                        help="every split x devices 1..4 x every toggle (ignores the axis flags;"
                             " -p REGEX picks scenarios by id)")
    isolation_options(parser, "scenario", 600.0)
    parser.add_argument("--time", action="store_true",
                        help="record each decode step's time (median, IQR, samples in the"
                             " record's perf block): what the report's speedup and device"
                             " scaling plots draw; timings under -j share the cores")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    add_allow_unavailable(parser)
    parser.set_defaults(func=cmd_scenario)


def selected_specs(args) -> list[ScenarioSpec]:
    if args.layers < 1 or args.steps < 1:
        raise UsageError(f"--layers {args.layers} and --steps {args.steps} must be >= 1")
    if args.matrix:
        try:
            specs = matrix(seed=args.seed, layers=args.layers, steps=args.steps)
        except ValueError as exc:  # e.g. fewer layers than the matrix's layer split has devices
            raise UsageError(f"--matrix with --layers {args.layers}: {exc}") from None
        return _filtered(specs, args.pattern)
    try:
        return [ScenarioSpec(split=args.split, devices=args.devices, layers=args.layers,
                             steps=args.steps, seed=args.seed, model=args.model,
                             rope_cache=_on_off(args.rope_cache),
                             graph_reuse=_on_off(args.graph_reuse), evict=_on_off(args.evict),
                             delay=_on_off(args.delay))]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _filtered(specs: list[ScenarioSpec], pattern: str | None) -> list[ScenarioSpec]:
    if not pattern:
        return specs
    regex = compile_pattern(pattern)
    chosen = [spec for spec in specs if regex.search(spec.id)]
    if not chosen:
        raise UsageError(f"no scenario of the matrix matches -p {pattern!r}")
    return chosen


def cmd_scenario(args) -> int:
    if args.jobs < 1:
        raise UsageError(f"-j {args.jobs}: needs at least 1 worker")
    check_timeout(args)
    refuse_unused(args, "scenario", ["-o"], " (a scenario runs every op of a decode step)")
    if not args.matrix:
        refuse_unused(args, "scenario", ["-p"], " without --matrix (the axis flags pick the"
                      " one scenario)")
    specs = selected_specs(args)
    names = parse_backends(args.backend)  # unknown names: a usage error before anything runs
    writer = open_writer(args.results)
    report = output.make_reporter(args.output, quiet=args.quiet)
    run_id, failed = new_run_id(), False
    try:
        for name in names:
            failed |= _run_backend(name, specs, args, run_id, writer, report)
    finally:
        if writer:
            writer.close()
        report.finish()
    return 1 if failed else 0


def _run_backend(name, specs, args, run_id, writer, report) -> bool:
    cls = backend_class(name)
    ok, why = cls.available()
    if not ok:
        return report_unavailable(report, args, cls.name, why)
    _, broken = probe_backend(name, {})
    if broken:  # one line, not a traceback per scenario; the next backend still runs
        report.broken_backend(cls.name, broken)
        return True
    env = environment({"name": cls.name})
    specs = specs_for(name, specs)
    records = run_specs(name, specs, run_id, args.jobs, isolated(args), check_timeout(args),
                        timed=args.time)
    return record_backend_run(report, cls.name, len(specs), records, writer, env)
