"""Verb ``scenario``: multi-device, stateful decode scenarios judged at every step."""

from __future__ import annotations

from dataclasses import dataclass

from opbench.errors import UsageError
from opbench.harness import models
from opbench.harness.records import environment, new_run_id
from opbench.harness.scenario.config import KV_DTYPES, ScenarioSpec
from opbench.harness.scenario.matrix import matrix, run_specs, specs_for, sweep_prompt_lens
from opbench.harness.scenario.splits import SEQUENCE_SPLITS, SPLITS
from opbench.harness.shards import take_shard

from . import output
from .common import (
    add_allow_unavailable,
    add_executor_option,
    add_shard_option,
    check_timeout,
    common_options,
    compile_pattern,
    executor_arg,
    isolated,
    isolation_options,
    open_writer,
    parse_backends,
    record_backend_run,
    refuse_unused,
    run_backend,
    shard_arg,
    warn_unused_fields,
)

EPILOG = """examples:
  opbench scenario --split layer --devices 3 --evict on
  opbench scenario --split zigzag --devices 4 --graph-reuse on --delay on --steps 6
  opbench scenario --matrix -j 2 --results runs/scenarios.jsonl
  opbench scenario --matrix -j 2 --executor ray    the scenarios as Ray actors
  opbench scenario --matrix -p 'split=zigzag.*evict=on'
  opbench scenario --split ring --devices 2 --evict on --kv-dtype bf16
  opbench scenario --matrix -j 2 --timeout 120 -b my_backend.py:Mine  (a crash or hang of one
      scenario becomes its CRASH/TIMEOUT record; the others go on)
  opbench scenario --split ring --devices 4 --ranks          each device its own process
  torchrun --nnodes 2 --nproc-per-node 2 ... -m opbench scenario --split ring --devices 4 --ranks
  opbench scenario --sweep devices=1..8 --results sweep.jsonl
exit codes: 0 every step matched the float64 oracle, 1 a divergence (the first diverging step,
layer, device and metric are printed), 2 a usage error"""


def _on_off(value: str) -> bool:
    return value == "on"


def register(subparsers, common) -> None:
    import argparse

    parser = subparsers.add_parser(
        "scenario", parents=[common_options(unused=("-o",))], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="decode loop through a small transformer over devices, caches and graphs, judged"
             " at every step against a float64 model")
    parser.add_argument("--split", choices=SPLITS, default="none",
                        help="how the model is split over --devices (default: none)")
    parser.add_argument("--layers", type=int, default=6, help="transformer layers (default 6)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps after the prefill"
                        " (default 4)")
    parser.add_argument("--model", default="gemma3", metavar="NAME|config.json",
                        help="per-layer RoPE pattern: gemma3 (default: global layers scaled x8),"
                             " gemma3-1b, or a preset of `opbench models` or a Hugging Face"
                             " config.json (its head size, head ratio and per-layer RoPE or ALiBi;"
                             " fewer heads, narrower, --layers layers)")
    for toggle, default, what in (("rope-cache", "on", "the backend's sin/cos cache"),
                                  ("graph-reuse", "off", "build the decode step once, replay it"),
                                  ("evict", "off", "KV eviction + key re-rotation"),
                                  ("delay", "off", "random stream delays (fault injection)")):
        parser.add_argument(f"--{toggle}", choices=["on", "off"], default=default,
                            help=f"{what} (default {default})")
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default="f32",
                        help="the K/V caches' dtype; f16 / bf16 are judged by the precision"
                             " rule (default f32)")
    parser.add_argument("--matrix", action="store_true",
                        help="every split x devices 1..4 x every toggle (ignores the axis flags;"
                             " -p REGEX picks scenarios by id)")
    isolation_options(parser, "scenario", 600.0)
    add_executor_option(parser, "scenario")
    parser.add_argument("--time", action="store_true",
                        help="record each decode step's time (median, IQR, samples in the"
                             " record's perf block): what the report's speedup and device"
                             " scaling plots draw; timings under -j share the cores")
    parser.add_argument("--sweep", default=None, metavar="devices=A..B",
                        help="every device count A..B for the sequence splits (ring, zigzag,"
                             " stripe; or the --split given): error per step vs world size")
    parser.add_argument("--ranks", action="store_true",
                        help="each logical device is its own process, a torch.distributed rank"
                             " (gloo); started here on a free port, or this process is one"
                             " rank when launched by torchrun (env:// rendezvous)")
    parser.add_argument("--inject-fault", default=None, metavar="raise|exit|hang:RANK:STEP",
                        help="--ranks fault injection: that rank raises, dies or hangs at the"
                             " start of that step")
    parser.add_argument("--delay-ranks", default=None, metavar="R[,R..]",
                        help="--ranks with --delay on: only these ranks' streams are delayed")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    add_allow_unavailable(parser)
    add_shard_option(parser)
    parser.set_defaults(func=cmd_scenario)


def selected_specs(args) -> list[ScenarioSpec]:
    if args.layers < 1 or args.steps < 1:
        raise UsageError(f"--layers {args.layers} and --steps {args.steps} must be >= 1")
    if args.sweep and (args.matrix or args.devices != 1):
        raise UsageError("--sweep chooses the device counts and builds its own scenarios: drop "
                         + ("--matrix" if args.matrix else f"--devices {args.devices}"))
    warn_unused_model_fields(args.model)
    if args.matrix:
        try:
            specs = matrix(seed=args.seed, layers=args.layers, steps=args.steps)
        except ValueError as exc:  # e.g. fewer layers than the matrix's layer split has devices
            raise UsageError(f"--matrix with --layers {args.layers}: {exc}") from None
        return _filtered(specs, args.pattern)
    if args.sweep:
        return _sweep(args)
    try:
        return [ScenarioSpec(split=args.split, devices=args.devices, layers=args.layers,
                             steps=args.steps, seed=args.seed, model=args.model,
                             rope_cache=_on_off(args.rope_cache),
                             graph_reuse=_on_off(args.graph_reuse), evict=_on_off(args.evict),
                             delay=_on_off(args.delay), kv_dtype=args.kv_dtype)]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def warn_unused_model_fields(ref: str) -> None:
    """A config.json's fields the scenarios do not read, as `test --model` lists them (a typo
    such as rope_scalling would otherwise run plain RoPE without a word)."""
    if not ref.endswith(".json"):
        return  # a built-in scenario model or a preset: every field is read
    try:
        model = models.load(ref)
    except models.ModelError:
        return  # the scenario's own check says what is wrong, once
    warn_unused_fields(ref, model)


def _sweep(args) -> list[ScenarioSpec]:
    axis, _, span = args.sweep.partition("=")
    low, _, high = span.partition("..")
    if axis != "devices" or not low.isdigit() or not high.isdigit() or not 1 <= int(low) <= int(
            high):
        raise UsageError(f"--sweep {args.sweep!r} must be devices=A..B with 1 <= A <= B")
    if args.split not in ("none", *SEQUENCE_SPLITS):
        raise UsageError(f"--sweep runs the sequence splits ({', '.join(SEQUENCE_SPLITS)}); "
                         f"--split {args.split} has no sweep")
    splits = [args.split] if args.split in SEQUENCE_SPLITS else list(SEQUENCE_SPLITS)
    try:
        return _sweep_specs(args, splits, range(int(low), int(high) + 1))
    except ValueError as exc:  # e.g. a model config.json the scenarios cannot run
        raise UsageError(f"--sweep {args.sweep}: {exc}") from None


def _sweep_specs(args, splits: list[str], counts: range) -> list[ScenarioSpec]:
    """Every split at every count, all with the prompts that fit the largest count."""
    prompts = sweep_prompt_lens(args.model, counts[-1])
    return [ScenarioSpec(split=split, devices=n, layers=args.layers, steps=args.steps,
                         seed=args.seed, model=args.model, rope_cache=_on_off(args.rope_cache),
                         graph_reuse=_on_off(args.graph_reuse), evict=_on_off(args.evict),
                         delay=_on_off(args.delay), kv_dtype=args.kv_dtype,
                         prompt_lens=prompts)
            for split in splits for n in counts]


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
    executor_arg(args)
    refuse_unused(args, "scenario", ["-o"], " (a scenario runs every op of a decode step)")
    if not args.matrix:
        refuse_unused(args, "scenario", ["-p"], " without --matrix (the axis flags pick the"
                      " one scenario)")
    specs = take_shard(selected_specs(args), shard_arg(args))
    if not specs:
        raise UsageError(f"no scenario in --shard {args.shard}")
    names = parse_backends(args.backend)  # unknown names: a usage error before anything runs
    ranks = rank_options(args, names, specs)
    if ranks is not None and ranks.torchrun_rank not in (None, 0):
        return _run_silent_rank(specs, ranks)
    writer = open_writer(args.results, shard_arg(args))
    report = output.make_reporter(args.output, quiet=args.quiet)
    run_id, failed = new_run_id(), False
    try:
        for name in names:
            if ranks is not None:
                failed |= _run_ranks(specs, ranks, run_id, writer, report)
                continue
            failed |= _run_backend(name, specs, args, run_id, writer, report)
    finally:
        if writer:
            writer.close()
        report.finish()
    return 1 if failed else 0


def _run_backend(name, specs, args, run_id, writer, report) -> bool:
    specs = specs_for(name, specs)
    return run_backend(report, args, name, {}, len(specs), lambda: run_specs(
        name, specs, run_id, args.jobs, isolated(args), check_timeout(args), timed=args.time,
        executor=executor_arg(args)),
        writer, describe=False)  # each scenario opens the backend with its own toggles


# -- devices as ranks ---------------------------------------------------------------------------
@dataclass
class RankOptions:
    timeout: float
    fault: object
    delay_ranks: set | None
    torchrun_rank: int | None  # this process's rank under torchrun, else None


def rank_options(args, names: list[str], specs: list[ScenarioSpec]) -> RankOptions | None:
    """--ranks and its options, checked against the scenarios (a fault or delay on a rank or
    step none of them has would never happen: the run would pass having tested nothing of
    it); None without --ranks."""
    extras = [opt for opt, value in (("--inject-fault", args.inject_fault),
                                     ("--delay-ranks", args.delay_ranks)) if value]
    if not args.ranks:
        if extras:
            raise UsageError(f"{extras[0]} needs --ranks")
        return None
    if names != ["cpu"]:
        raise UsageError("--ranks runs the cpu backend's kernels in every rank: use -b cpu")
    if args.jobs != 1 or args.executor != "local" or args.isolate:
        raise UsageError("--ranks: every scenario already runs one process per device; drop -j,"
                         " --executor and --isolate")
    try:
        import torch.distributed  # noqa: F401
    except ImportError:
        raise UsageError("--ranks needs torch.distributed: pip install 'opbench[torch]'") from None
    from opbench.harness.ranks.driver import Fault
    from opbench.harness.ranks.launch import under_torchrun

    try:
        fault = Fault.parse(args.inject_fault) if args.inject_fault else None
        delay = {int(r) for r in args.delay_ranks.split(",")} if args.delay_ranks else None
    except ValueError as exc:
        raise UsageError(str(exc) if "inject" in str(exc) else
                         f"--delay-ranks {args.delay_ranks!r} must be rank numbers, e.g. 1,3"
                         ) from None
    _check_ranks_exist(args, fault, delay, specs)
    import os

    return RankOptions(check_timeout(args), fault, delay,
                       int(os.environ["RANK"]) if under_torchrun() else None)


def _check_ranks_exist(args, fault, delay: set[int] | None, specs: list[ScenarioSpec]) -> None:
    ranks = max(spec.devices for spec in specs)
    if fault and (fault.rank >= ranks or fault.step > args.steps):
        raise UsageError(f"--inject-fault {args.inject_fault}: the scenarios have ranks 0.."
                         f"{ranks - 1} and steps 0..{args.steps}")
    if delay and max(delay) >= ranks:
        raise UsageError(f"--delay-ranks {args.delay_ranks}: the scenarios have ranks 0.."
                         f"{ranks - 1}")
    if delay and not any(spec.delay for spec in specs):
        raise UsageError("--delay-ranks chooses whose streams --delay on delays: add --delay on")


def _rank_records(specs, ranks: RankOptions, run_id: str):
    from opbench.harness.ranks.launch import check_torchrun_world, run_as_torchrun_rank, run_ranks

    if ranks.torchrun_rank is not None:
        try:
            check_torchrun_world(specs)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return run_as_torchrun_rank(specs, run_id, ranks.fault, ranks.delay_ranks)
    return run_ranks(specs, run_id, ranks.timeout, ranks.fault, ranks.delay_ranks)


def _run_ranks(specs, ranks: RankOptions, run_id, writer, report) -> bool:
    env = environment({"name": "cpu", "ranks": True})
    return record_backend_run(report, "cpu", len(specs), _rank_records(specs, ranks, run_id),
                              writer, env)


def _run_silent_rank(specs, ranks: RankOptions) -> int:
    """A torchrun rank other than 0: runs its part, rank 0 reports."""
    for _record in _rank_records(specs, ranks, new_run_id()):
        pass
    return 0
