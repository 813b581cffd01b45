"""Verb ``perf``: time the perf case tables per backend, or two backends interleaved (``--ab``).

A backend reference for ``--ab`` (and ``-b``, as in every verb) may carry options:
``NAME[:opt=val,...]``, e.g. ``cpu:rope_cache=off`` (``opbench.harness.registry``).
"""

from __future__ import annotations

import math
import os
import sys

from opbench.errors import BackendSetupError, UsageError
from opbench.harness.cases import filter_cases
from opbench.harness.pool import setup_failure
from opbench.harness.records import FAILING, new_run_id
from opbench.harness.registry import backend_label, open_backend, parse_ref
from opbench.harness.shards import take_shard
from opbench.perf import run as perf_mode
from opbench.perf import stats, timing
from opbench.perf.cross_ab import split_source
from opbench.perf.watchdog import CaseWatchdog

from . import output
from .common import (
    add_shard_option,
    check_timeout,
    common_options,
    compile_pattern,
    open_writer,
    parse_backends,
    parse_ops,
    parse_threshold,
    shard_arg,
)

#: the options only --ab reads, with their defaults: given without --ab, a usage error
AB_ONLY = {"--threshold": "5%", "--quantile": stats.DEFAULT_QUANTILE, "--epochs": 4,
           "--settle-ms": 0.0}


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "perf", parents=[common_options(outputs=("console", "csv", "json"))],
        help="time the perf case tables (real model shapes)",
        description="Warm up, then time each case until --budget-ms (at least --min-samples); "
        "every sample is kept in --results.  --ab A B interleaves two backends round by round.")
    p.add_argument("--sizes", choices=perf_mode.SIZES, default="full",
                   help="full: model shapes; small: tiny shapes for CI and tests")
    p.add_argument("--budget-ms", type=float, default=timing.DEFAULT_BUDGET_MS,
                   help="time budget per case and backend (default: %(default)s)")
    p.add_argument("--min-samples", type=int, default=timing.DEFAULT_MIN_SAMPLES,
                   help="at least this many samples, whatever the budget (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=timing.DEFAULT_WARMUP,
                   help="untimed calls first (default: %(default)s)")
    p.add_argument("--cold", action="store_true",
                   help="evict the device's cache before every sample (the backend's "
                        "flush_l2; on the host, twice its last-level cache is written)")
    p.add_argument("--ab", nargs=2, metavar=("A", "B"),
                   help="interleave backend refs A and B (NAME[:opt=val,...]); replaces -b."
                   " A side written REF@PATH runs from the opbench source tree at PATH, each"
                   " side in its own process: base and head of a change in one job (docs/ci.md)")
    p.add_argument("--threshold", default=AB_ONLY["--threshold"],
                   help="--ab verdict threshold, e.g. 5%% or 0.05 (default: %(default)s)")
    p.add_argument("--quantile", type=float, default=AB_ONLY["--quantile"],
                   help="--ab compares this quantile of the samples (default: %(default)s, as "
                   "`opbench gate` does, so the table and the gate agree on one file)")
    p.add_argument("--epochs", type=int, default=AB_ONLY["--epochs"],
                   help="--ab: re-allocate both sides' buffers this many times, splitting the"
                        " budget (default: %(default)s; see docs/perf.md)")
    p.add_argument("--settle-ms", type=float, default=AB_ONLY["--settle-ms"], metavar="MS",
                   help="--ab: idle MS ms (untimed) before each side's batch, so threads the "
                        "other side left spinning have gone to sleep (an OpenMP backend's "
                        "spin otherwise holds a core into the next side's samples; 20 covers "
                        "GNU OpenMP's default), then re-warm it with --warmup untimed calls "
                        "(default: %(default)s; see docs/perf.md)")
    p.add_argument("--pin-cpu", default=None, metavar="N[,M..]|auto|none",
                   help="run this process and every thread it starts on these CPUs (default: "
                        "auto with --ab: as many CPUs as the more threaded side computes with;"
                        " none otherwise); see docs/perf.md")
    p.add_argument("--fresh-inputs", action="store_true",
                   help="new random inputs before every sample (untimed): a backend cannot "
                   "answer from a cache keyed on its inputs")
    p.add_argument("--repeat", type=int, default=1, metavar="R",
                   help="R independent runs, each in a fresh process, one record per case "
                   "with each run's samples kept apart: what `opbench gate` needs to compare "
                   "two separate invocations (default: %(default)s; on a 2-core machine with "
                   "a busy neighbour 25 runs a side resolved a 15%% change)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only problems (cases that did not time OK) and the A/B table")
    p.add_argument("--no-calibrate", action="store_true",
                   help="do not measure the machine's ceilings when none are cached")
    p.add_argument("--executor", default="local", metavar="local",
                   help="local only: perf times on this machine (see the refusal of ray)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop the run when one case (one backend's, or an --ab pair's) takes "
                   "longer than S seconds, naming it and printing where every thread was; "
                   "records written so far are kept, exit 124 (default: no limit; not with "
                   "--repeat or a REF@PATH side, whose cases run in other processes)")
    add_shard_option(p)
    p.set_defaults(func=cmd_perf, default_timeout=None)


# -- backend references ----------------------------------------------------------------------------
def open_for_timing(ref: str):
    """(backend, None) ready for ops, or (None, why it is unavailable).  A bad option is a
    UsageError; a constructor that raises anything else is BackendSetupError, one line that
    fails this backend (as ``opbench test`` reports it), not a traceback."""
    parsed = parse_ref(ref)
    ok, why = parsed.cls.available()
    if not ok:
        return None, why
    try:
        return open_backend(parsed), None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"backend {ref!r}: {exc}") from None
    except Exception as exc:
        raise BackendSetupError(setup_failure(ref, exc)) from None


# -- selection and options -------------------------------------------------------------------------
def select_perf_cases(args) -> list:
    ops = parse_ops(args.op)
    compile_pattern(args.pattern)
    cases = [c for c in perf_mode.perf_cases(args.sizes) if c.op in ops]
    cases = take_shard(filter_cases(cases, args.pattern), shard_arg(args))
    if not cases:
        raise UsageError("no perf case matches the given -o/-p" + (" in this --shard"
                                                                    if args.shard else ""))
    return cases


def case_timeout(args, cross: bool) -> float | None:
    """--timeout in seconds (None: no limit): > 0, and only where this process times the
    cases (its watchdog cannot stop another process's hang)."""
    seconds = check_timeout(args)  # the parser's default_timeout is None: no limit
    if seconds is not None and (args.repeat > 1 or cross):
        raise UsageError("--timeout stops cases timed in this process; with --repeat or a "
                         "REF@PATH side they run in other processes: drop it")
    return seconds


def refuse_ab_only(args) -> None:
    """An --ab option given without --ab (or -b beside --ab) would be ignored: refuse it."""
    if args.ab:
        if getattr(args, "backend_given", False):
            raise UsageError("--ab A B names the backends; drop -b")
        return
    for flag, default in AB_ONLY.items():
        if getattr(args, flag[2:].replace("-", "_")) != default:
            raise UsageError(f"{flag} is read by --ab only; drop it or add --ab A B")


def perf_options(args) -> perf_mode.PerfOptions:
    if args.budget_ms < 0:
        raise UsageError(f"--budget-ms {args.budget_ms:g} must be >= 0")
    if args.min_samples < 1:
        raise UsageError(f"--min-samples {args.min_samples} must be >= 1")
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup} must be >= 0")
    if args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs} must be >= 1")
    if not 0 <= args.settle_ms < math.inf:  # NaN and inf too
        raise UsageError(f"--settle-ms {args.settle_ms:g} must be a finite number >= 0")
    return perf_mode.PerfOptions(budget_ms=args.budget_ms, min_samples=args.min_samples,
                                 warmup=args.warmup, cold=args.cold, seed=args.seed,
                                 ceilings=_ceilings(args), epochs=args.epochs,
                                 fresh_inputs=args.fresh_inputs, settle_ms=args.settle_ms)


def _ceilings(args):
    from opbench.perf.calibrate import CeilingsError, load_ceilings, stale_entry

    try:
        ceilings = load_ceilings(measure_if_missing=not args.no_calibrate)
        if ceilings is None and stale_entry():
            print("opbench: the ceilings cache holds an older opbench's figures (one core "
                  "only, or a copy ceiling without streaming stores); run `opbench calibrate` "
                  "for fractions of the ceilings", file=sys.stderr)
        return ceilings
    except CeilingsError as exc:
        raise UsageError(str(exc)) from None


def pin_cpu(choice: str | None, default: str) -> int | None:
    """Pin this process (and the threads it starts from now on: backend workers) to one CPU.

    Why: on a loaded 2-core machine the scheduler parks each backend's worker thread on a core
    for seconds at a time, and an A/B comparison's two instances then see different load --
    measured here as 10-40% level shifts between A and B of one A/A run (docs/perf.md).  On one
    core both sides share every disturbance, round by round."""
    choice = (choice or default).strip().lower()
    if choice == "none" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if choice == "auto":
        cpu = allowed[-1]
    else:
        try:
            cpu = int(choice)
        except ValueError:
            raise UsageError(f"--pin-cpu {choice!r}: give a CPU number, auto or none") from None
        if cpu not in allowed:
            raise UsageError(f"--pin-cpu {cpu}: not one of this process's CPUs {allowed}")
    os.sched_setaffinity(0, {cpu})
    return cpu


# -- the verb --------------------------------------------------------------------------------------
#: why perf stays on this machine: its verdicts compare times with this machine's measured
#: ceilings (docs/perf.md) and --ab pins this process's CPUs; a Ray worker elsewhere has neither
EXECUTOR_REFUSED = ("perf --executor {}: perf times one case at a time against this machine's"
                    " measured ceilings, which a Ray worker on another machine does not have;"
                    " run `opbench perf --shard I/N` on each machine and `opbench merge` the"
                    " results")


def cmd_perf(args) -> int:
    if args.jobs != 1 or args.devices != 1:
        # timings of cases running side by side would measure their contention
        raise UsageError("perf times one case at a time on one device: drop -j/--devices")
    if args.executor != "local":
        raise UsageError(EXECUTOR_REFUSED.format(args.executor))
    show = output.make_reporter(args.output, quiet=args.quiet,
                                console=output.PerfConsoleReporter)
    refuse_ab_only(args)
    cases = select_perf_cases(args)
    # unknown names and options are usage errors before any timing
    cross = args.ab and any(split_source(text)[1] is not None for text in args.ab)
    if cross:  # a side's ref is its own tree's to parse: its backends and options may differ
        refs = list(args.ab)
    else:
        refs = [parse_ref(r).text for r in args.ab] if args.ab else parse_backends(args.backend)
    threshold = parse_threshold(args.threshold) if args.ab else None
    if args.ab and not 0 < args.quantile < 1:
        raise UsageError(f"--quantile {args.quantile} must be between 0 and 1")
    options = perf_options(args)
    if args.repeat < 1:
        raise UsageError(f"--repeat {args.repeat} must be >= 1")
    if args.repeat > 1 and args.ab:
        raise UsageError("--repeat and --ab do not mix: --ab interleaves its two sides in one"
                         " process, which already shares every run-to-run shift")
    watchdog = CaseWatchdog(case_timeout(args, cross))
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if not args.ab:  # --ab pins once its sides are open: the set depends on their threads
        pin_cpu(args.pin_cpu, default="none")
    writer = open_writer(args.results, shard_arg(args))
    run_id = new_run_id()
    try:
        if cross:
            failed = _run_cross_ab(refs, cases, options, run_id, writer, show, threshold,
                                   args.quantile, args.pin_cpu, args.sizes)
        elif args.ab:
            failed = _run_ab(refs, cases, options, run_id, writer, show, threshold,
                             args.quantile, args.pin_cpu, watchdog)
        elif args.repeat > 1:
            failed = _run_repeated(refs, cases, options, run_id, writer, show, args.repeat)
        else:
            failed = any([_run_backend(ref, cases, options, run_id, writer, show, watchdog)
                          for ref in refs])
    finally:
        if writer:
            writer.close()
        show.finish()
        if affinity is not None:  # an in-process caller (tests, scripts) gets its CPUs back
            os.sched_setaffinity(0, affinity)
    return 1 if failed else 0


def _emit(record: dict, writer, show: output.ConsoleReporter, side: str = "") -> bool:
    if writer:
        writer.write(record)
    show.case(record, side)
    return record["status"] in FAILING


def _run_backend(ref, cases, options, run_id, writer, show, watchdog: CaseWatchdog) -> bool:
    label = backend_label(ref)  # once: it parses the reference and its options
    try:
        backend, why = open_for_timing(ref)
    except BackendSetupError as exc:  # fails this backend; the next one still runs
        show.header(f"Backend {label}: FAIL ({exc})")
        return True
    if backend is None:
        show.header(f"Backend {label}: skipped ({why})")
        return False
    if not show.quiet:  # -q prints problems only: a header over nothing is noise
        show.header(f"Backend {label}:")
    env = perf_mode.backend_env(backend)
    failed = False
    try:
        for case in cases:
            with watchdog.case(label, case.id):
                record = perf_mode.run_perf_case(backend, case, options, run_id, label=label,
                                                 env=env)
            failed |= _emit(record, writer, show)
    finally:
        backend.close()
    return failed


def _run_repeated(refs, cases, options, run_id, writer, show, repeat: int) -> bool:
    from .perf_repeat import repeated_records

    available, failed = [], False
    for ref in refs:
        try:  # the runs' processes skip a backend that cannot open: say why once, here
            backend, why = open_for_timing(ref)
        except BackendSetupError as exc:
            show.header(f"Backend {backend_label(ref)}: FAIL ({exc})")
            failed = True
            continue
        if backend is None:
            show.header(f"Backend {backend_label(ref)}: skipped ({why})")
            continue
        backend.close()
        available.append(ref)
    progress = show.header if not show.quiet else (lambda text: None)
    for record in repeated_records(available, cases, options, run_id, repeat, progress):
        failed |= _emit(record, writer, show)
    return failed


def ab_labels(label_a: str, label_b: str) -> tuple[str, str]:
    """The backend names in the records: the sides' labels, made distinct for an A/A
    comparison."""
    return (label_a, label_b) if label_a != label_b else (f"{label_a}#A", f"{label_b}#B")


def _run_ab(refs, cases, options, run_id, writer, show, threshold, quantile,
            pin_choice, watchdog: CaseWatchdog) -> bool:
    from .pinning import compute_threads

    labels = ab_labels(*map(backend_label, refs))  # one configuration, one name
    sides = {}
    try:
        for label, ref in zip(labels, refs):
            backend, why = open_for_timing(ref)
            if backend is None:
                raise UsageError(f"--ab: backend {ref} is unavailable: {why}")
            sides[label] = backend
        threads = {label: compute_threads(backend) for label, backend in sides.items()}
        placement = _placement(pin_choice, threads, show)
        envs = {label: perf_mode.backend_env(b) for label, b in sides.items()}
        def run_pair(case):
            with watchdog.case(" and ".join(labels), case.id):
                return perf_mode.run_ab_case(sides, case, options, run_id, envs)

        return _time_ab(run_pair, labels, cases, writer, show, threshold, quantile,
                        options.seed, placement)
    finally:
        for backend in sides.values():
            backend.close()


def _placement(pin_choice, threads: dict[str, int], show) -> dict[str, dict]:
    """Pin this process (and so each side) to one fair CPU set; what each record says of it."""
    from .pinning import pin_for_ab

    cpus = pin_for_ab(pin_choice, threads)
    show.header(f"CPU set {cpus if cpus is not None else 'unpinned'}; threads: "
                + ", ".join(f"{label} {n}" for label, n in threads.items()))
    return {label: {"cpu_set": cpus, "threads": n} for label, n in threads.items()}


def _run_cross_ab(texts, cases, options, run_id, writer, show, threshold, quantile,
                  pin_choice, sizes) -> bool:
    """--ab with a side from another source tree: each side in its own worker process."""
    from opbench.perf import cross_ab

    labels = ab_labels(*texts)
    sides = cross_ab.start_sides(dict(zip(labels, map(split_source, texts))), sizes)
    try:
        for side in sides.values():
            show.header(f"{side.label}: {side.name} from {side.source.short()}")
        placement = _placement(pin_choice, {label: s.threads for label, s in sides.items()},
                               show)
        for side in sides.values():
            side.pin(placement[side.label]["cpu_set"])
        return _time_ab(_cross_case_runner(sides, options, run_id, placement, show), labels,
                        cases, writer, show, threshold, quantile, options.seed)
    finally:
        for side in sides.values():
            side.close()


def _cross_case_runner(sides, options, run_id, placement, show):
    """One case on both workers; after a worker died, that case's records say CRASH and the
    remaining cases are not timed (their records say why)."""
    from opbench.perf import cross_ab

    gone: list[str] = []

    def run(case) -> dict:
        if gone:
            return cross_ab.not_timed(sides, case, run_id, gone[0])
        try:
            return cross_ab.run_cross_case(sides, case, options, run_id, placement)
        except cross_ab.WorkerDied as died:
            gone.append(f"not timed: {died}")
            show.header(f"--ab: {died}")
            return cross_ab.crash_records(sides, case, run_id, died)
    return run


def _time_ab(run_case, labels, cases, writer, show, threshold, quantile, seed,
             placement=None) -> bool:
    show.header(f"A/B interleaved: A = {labels[0]}, B = {labels[1]}")
    failed = False
    by_side: dict[str, list] = {label: [] for label in labels}
    for case in cases:
        records = run_case(case)
        for side, (label, record) in zip("AB", records.items()):
            if record.get("perf") and placement:  # where it ran: CPU set, its threads
                record["perf"].update(placement[label])
            failed |= _emit(record, writer, show, side)
            by_side[label].append(record)
    rows = perf_mode.ratio_rows(by_side[labels[0]], by_side[labels[1]], threshold=threshold,
                                quantile=quantile, seed=seed)
    if show.fmt == "console":
        print_ratio_table(rows, labels, threshold, quantile)
    return failed


def print_ratio_table(rows, labels, threshold: float, quantile: float) -> None:
    what = "median" if quantile == 0.5 else f"q{quantile:g}"
    print(f"\nB/A ratio of {what} times (>1: B slower), 95% bootstrap CI, threshold "
          f"{threshold:.0%}; A = {labels[0]}, B = {labels[1]}")
    print(f"  {'ratio':>7s} {'95% CI':>17s}  {'verdict':15s} {'A us':>10s} {'B us':>10s}  case")
    for r in rows:
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        print(f"  {r['ratio']:7.3f} {ci:>17s}  {r['verdict']:15s} {r['a_ns'] / 1e3:10.2f}"
              f" {r['b_ns'] / 1e3:10.2f}  {r['case_id']}")
