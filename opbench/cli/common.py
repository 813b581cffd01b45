"""What every verb shares: the common options, op/backend/case selection, the results file and
the per-backend record loop.  Verb modules import from here, never from each other."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter

from opbench.errors import BackendSetupError, UsageError
from opbench.harness import models
from opbench.harness.cases import Case, filter_cases
from opbench.harness.executors import ExecutorChoice, parse_executor
from opbench.harness.models import Model
from opbench.harness.models import cases as models_cases
from opbench.harness.ops import SPECS
from opbench.harness.pool import setup_failure
from opbench.harness.records import environment
from opbench.harness.registry import (
    backend_class,
    backend_label,
    backend_options,
    open_backend,
    parse_ref,
    split_backend_list,
)
from opbench.harness.shards import Shard, parse_shard, take_shard
from opbench.harness.store import ResultWriter


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        raise UsageError(message)


class _GivenBackends(argparse.Action):
    """-b that remembers it was given: a backend named on purpose must run (see
    ``unavailable_fails``), one chosen by default may skip."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.backend_given = True


OUTPUTS = ("console", "csv", "json", "junit")


def seed_value(text: str) -> int:
    """--seed: NumPy's generators take no negative seed (a usage error here, not a traceback
    from the first case that draws)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if seed < 0:
        raise argparse.ArgumentTypeError(f"{seed} must be >= 0")
    return seed


def common_options(unused: tuple[str, ...] = (), outputs: tuple[str, ...] = OUTPUTS
                   ) -> argparse.ArgumentParser:
    """Options every verb that runs cases shares.  ``unused``: flags the verb refuses
    (``refuse_unused``), left out of its --help; ``outputs``: the --output formats it has."""
    common = Parser(add_help=False)
    common.add_argument("-b", "--backend", default="cpu", action=_GivenBackends,
                        help="backends, comma separated: a registered name, package.module:Class"
                             " or path/file.py:Class, each optionally with options"
                             " (cpu:rope_cache=off,jit=off; opbench doctor lists them)"
                             " (default: cpu)")
    common.add_argument("-o", "--op", default=None, help="ops, comma separated (default: all)")
    common.add_argument("-p", "--pattern", default=None,
                        help="regular expression matched against case ids")
    common.add_argument("--devices", type=int, default=1, help="logical devices (default: 1)")
    common.add_argument("--seed", type=seed_value, default=0,
                        help="input seed, an integer >= 0 (default: 0)")
    common.add_argument("-j", "--jobs", type=int, default=1,
                        help="worker processes (default: 1)")
    common.add_argument("--results", default=None,
                        help="append JSON Lines records to this file as each case finishes")
    common.add_argument("--output", choices=list(outputs),
                        default="console", help="output format on stdout")
    for action in common._actions:  # argparse has no public way to hide a parent's option
        if set(action.option_strings) & set(unused):
            action.help = argparse.SUPPRESS
    return common


def isolation_options(parser: argparse.ArgumentParser, item: str, timeout: float) -> None:
    """--isolate and --timeout of a verb whose items (cases, scenarios) may run in workers."""
    parser.add_argument("--isolate", action="store_true",
                        help="run each backend in child processes: a crash or hang becomes a"
                             f" CRASH/TIMEOUT record for that {item} and the run goes on")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"per-{item} limit in seconds, > 0 (default {timeout:g} with"
                             " --isolate or -j; given alone it implies --isolate: only a child"
                             f" process can be stopped when a {item} hangs)")
    parser.set_defaults(default_timeout=timeout)


def add_executor_option(parser: argparse.ArgumentParser, item: str) -> None:
    parser.add_argument("--executor", default="local", metavar="local|ray|ray://HOST:PORT|ray:auto",
                        help=f"where the {item}s' -j workers run: local processes (default) or"
                             " Ray actors (a new local Ray instance with -j CPUs, a Ray client"
                             " address, or ray:auto / ray:HOST:PORT to join a running cluster)")


def executor_arg(args) -> ExecutorChoice:
    try:
        return parse_executor(args.executor)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def check_timeout(args) -> float:
    """--timeout in seconds: > 0 and finite (0 used to mean no limit, and a hang then hung)."""
    if args.timeout is None:
        return args.default_timeout
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout:g}: needs a number of seconds > 0")
    return args.timeout


def isolated(args) -> bool:
    """Items run in workers: -j N, --isolate, a --timeout to enforce, or a Ray executor."""
    return (args.jobs > 1 or args.isolate or args.timeout is not None
            or getattr(args, "executor", "local") != "local")


# -- selection -------------------------------------------------------------------------------
def parse_ops(value: str | None) -> list[str]:
    if value is None:
        return list(SPECS)
    ops = [op.strip().upper() for op in value.split(",") if op.strip()]
    if not ops:
        raise UsageError(f"no op given to -o; choose from {', '.join(SPECS)} (or leave -o out"
                         " for all)")
    unknown = [op for op in ops if op not in SPECS]
    if unknown:
        raise UsageError(f"unknown op {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    return list(dict.fromkeys(ops))  # -o CPY,CPY runs the table once


def parse_backends(value: str, extra: dict | None = None) -> list[str]:
    """The ``-b`` refs (``NAME[:opt=val,...]``), each checked now -- backend found, options
    known and well-formed, ``extra`` (option flags such as --rope-cache) declared by it -- so
    a typo is a usage error before anything runs."""
    refs = split_backend_list(value)
    if not refs:
        raise UsageError("no backend given to -b")
    for ref in refs:
        backend_options(parse_ref(ref), extra)
    refuse_shared_labels(refs, extra)
    return refs


def refuse_shared_labels(refs: list[str], extra: dict | None = None) -> None:
    """Two different backends (classes, or option values) that records would call by one
    name (``registry.backend_label``) are a usage error: report and gate key records on
    that name and would merge their cases, the last record winning."""
    seen: dict[str, tuple] = {}
    for ref in refs:
        parsed = parse_ref(ref)
        label = backend_label(parsed, extra)
        config = (parsed.cls, sorted(backend_options(parsed, extra).items(), key=str))
        if seen.setdefault(label, (ref, config))[1] != config:
            raise UsageError(f"backends {seen[label][0]!r} and {ref!r} would both be called "
                             f"{label!r} in the records; give one of the classes a `name` "
                             "of its own")


def compile_pattern(pattern: str | None) -> re.Pattern | None:
    """The -p regular expression, or a usage error naming what is wrong with it."""
    if pattern is None:
        return None
    if not pattern:
        raise UsageError("-p '' is empty; leave -p out to select every case")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"bad regular expression -p {pattern!r}: {exc}") from None


def model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="NAME|config.json",
                        help="instead of the default tables: ROPE, ATTN, KV_ROTATE, SET_ROWS and"
                             " GET_ROWS cases at one model's parameters (a preset of `opbench"
                             " models` or a Hugging Face config.json)")


def load_model(ref: str) -> Model:
    """The parsed model; a config it cannot use is a usage error naming the field."""
    try:
        return models.load(ref)
    except models.ModelError as exc:
        raise UsageError(f"--model {ref}: {exc}") from None


def model_cases(ref: str) -> list[Case]:
    """A model's cases; says on stderr which config fields go unused and why ROPE cases are
    missing where the model has no RoPE (ALiBi); RoPE parameters that cannot be used are a
    usage error (running the other ops would pass the model untested)."""
    model = load_model(ref)
    warn_unused_fields(ref, model)
    broken = models.rope_error(model)
    if broken:  # the config is wrong: running the other ops would pass it untested
        raise UsageError(f"--model {ref}: {broken}")
    why = models.rope_ready(model)
    if why:
        print(f"opbench: --model {ref}: no ROPE or KV_ROTATE cases: {why}", file=sys.stderr)
    return models_cases.model_cases(ref)


def warn_unused_fields(ref: str, model) -> None:
    """Config fields opbench does not read (a typo such as rope_scalling among them)."""
    if model.unused:
        print(f"opbench: --model {ref}: fields not used: {', '.join(model.unused)}",
              file=sys.stderr)


def select_cases(args, quick: bool = False) -> list[Case]:
    compile_pattern(args.pattern)
    ops = parse_ops(args.op)
    large = getattr(args, "large", False)
    if large and (quick or getattr(args, "model", None)):
        raise UsageError("--large is its own case set; drop --quick and --model")
    if getattr(args, "model", None):
        if quick:
            raise UsageError("--model builds its own cases; drop --quick")
        cases = [c for c in model_cases(args.model) if c.op in ops]
        return take_shard(filter_cases(cases, args.pattern), shard_arg(args))
    selected: list[Case] = []
    for op in ops:
        spec = SPECS[op]
        if large:
            cases = spec.large_cases()
        else:
            cases = spec.quick_cases(seed=args.seed) if quick else spec.cases()
        selected += filter_cases(cases, args.pattern)
    return take_shard(selected, shard_arg(args))


#: peak host memory (GiB) of each op's --large case, from the cpu backend's runs scaled down
#: 16 times (docs/gpu.md, "Offsets past 2**31"): inputs, oracle and judge live on the host,
#: whatever the backend, so this bounds every backend
LARGE_HOST_GIB = {"SET_ROWS": 35, "GET_ROWS": 11, "ATTN": 19, "CPY": 25, "KV_ROTATE": 16}


def warn_if_large_cases_outgrow_memory(cases: list[Case], available: int | None) -> None:
    """One line per --large op that needs more host memory than is available: the system
    would kill the run with no word of why (exit 137).  The run still goes on: the figures
    are estimates, and records of finished cases are kept."""
    if available is None:
        return
    for op in dict.fromkeys(case.op for case in cases):
        need = LARGE_HOST_GIB.get(op, 0)
        if need * 2**30 > available:
            print(f"opbench: warning: --large {op} needs about {need} GiB of host memory "
                  f"(docs/gpu.md), {available / 2**30:.1f} GiB is available: the system may "
                  "kill the run; run it on a larger host, one op at a time (-o)",
                  file=sys.stderr)


def add_large_option(parser, verb: str) -> None:
    parser.add_argument("--large", action="store_true",
                        help=f"{verb} instead the cases whose element offsets pass 2**31 (one per"
                             " index-taking op, 4-8 GiB of tensors each; see docs/gpu.md)")


def add_shard_option(parser) -> None:
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only shard I of N (1-based; a stable split by case id: the N"
                             " shards are disjoint and together the whole selection); records"
                             " carry it for `opbench merge`")


def shard_arg(args) -> Shard | None:
    text = getattr(args, "shard", None)
    if text is None:
        return None
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def option_flags(args) -> dict:
    """Backend options given as flags: ``--rope-cache on|off`` is ``rope_cache=on|off`` for
    every -b backend (an option in the ref itself wins)."""
    options = {}
    if getattr(args, "rope_cache", None):
        options["rope_cache"] = args.rope_cache
    return options


def add_allow_unavailable(parser) -> None:
    parser.add_argument("--allow-unavailable", action="store_true",
                        help="a backend named with -b that cannot run here (not installed, no"
                             " device) is skipped with its reason instead of failing the run")


def unavailable_fails(args) -> bool:
    """A backend the user named with -b that cannot run fails the run (a CI job whose optional
    install broke must not go green); a default one, or --allow-unavailable, only skips."""
    return getattr(args, "backend_given", False) and not getattr(args, "allow_unavailable", False)


def report_unavailable(report, args, name: str, why: str) -> bool:
    """Print why a backend cannot run; True when that fails the run."""
    if unavailable_fails(args):
        report.unavailable_backend(name, why)
        return True
    report.skipped_backend(name, why)
    return False


#: the common options as (flag, attribute): a verb that does not use one refuses it
COMMON_FLAGS = {"-b": "backend", "-o": "op", "-p": "pattern", "--devices": "devices",
                "--seed": "seed", "-j": "jobs", "--results": "results", "--output": "output"}


def refuse_unused(args, verb: str, flags: list[str], why: str = "") -> None:
    """A common option the verb would silently ignore is a usage error, not a surprise."""
    defaults = vars(common_options().parse_args([]))
    for flag in flags:
        attribute = COMMON_FLAGS[flag]
        if getattr(args, attribute) != defaults[attribute]:
            raise UsageError(f"`opbench {verb}` does not use {flag}{why}; drop it")


def check_common(args) -> None:
    if args.jobs < 1:
        raise UsageError(f"-j {args.jobs}: needs at least 1 worker")
    if args.devices < 1:
        raise UsageError(f"--devices {args.devices}: needs at least 1 device")


def parse_threshold(text: str, option: str = "--threshold") -> float:
    from opbench.perf.gate import parse_threshold as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


# -- records ---------------------------------------------------------------------------------
def open_writer(path: str | None, shard: Shard | None = None) -> ResultWriter | None:
    if not path:
        return None
    writer = ResultWriter(path, stamp={"shard": str(shard)} if shard else None)
    try:
        writer.open()
    except OSError as exc:
        raise UsageError(f"cannot write results to {path!r}: {exc.strerror}") from None
    return writer


def record_backend_run(report, backend_name: str, total: int, records, writer, env) -> bool:
    """Store, print and count one backend's records as they come; True when any failed.
    Shared by every verb that runs cases (test, scenario)."""
    counts: Counter = Counter()
    with report.progress(backend_name, total) as advance:
        for record in records:
            record["env"] = env
            if writer:
                writer.write(record)
            counts[record["status"]] += 1
            report.case(record)
            advance()
    return report.backend_summary(backend_name, counts)


def probe_backend(name: str, options: dict) -> tuple[dict, str | None]:
    """(the backend's info, None), or ({...}, why it cannot be constructed): a constructor
    that raises is reported once, in one line, before any case runs."""
    try:
        backend = open_backend(name, options)
    except Exception as exc:
        return {"name": name}, setup_failure(name, exc)
    try:
        info = {"name": backend.name, **backend.info()}
    except Exception as exc:  # info is best effort; the run itself reports real errors
        info = {"name": backend.name, "info_error": str(exc)}
    backend.close()
    return info, None


def backend_info(name: str, options: dict) -> dict:
    return probe_backend(name, options)[0]


def run_backend_guarded(report, backend_name: str, run) -> bool:
    """``run()`` records one backend's cases; a backend that cannot be constructed (in this
    process or in a worker) fails that backend with one line, and the next backend runs."""
    try:
        return run()
    except BackendSetupError as exc:
        report.broken_backend(backend_name, str(exc))
        return True


def run_backend(report, args, name: str, options: dict, total: int, records, writer,
                describe: bool = True) -> bool:
    """One backend's run, as test and scenario do it; True when it fails the run.  A backend
    that cannot run here is skipped or fails (``report_unavailable``), one whose constructor
    raises fails in one line; else ``records()`` is stored, printed and counted.  ``describe``:
    the records' env carries the backend's ``info()`` under ``options`` (False: its name only,
    when each item opens the backend with options of its own, as scenarios do)."""
    cls, label = backend_class(name), backend_label(name, options)
    ok, why = cls.available()
    if not ok:
        return report_unavailable(report, args, label, why)
    info, broken = probe_backend(name, options)
    if broken:  # one line, not a traceback per item; the next backend still runs
        report.broken_backend(label, broken)
        return True
    env = environment(info if describe else {"name": cls.name})
    return run_backend_guarded(report, label, lambda: record_backend_run(
        report, label, total, records(), writer, env))
