"""Verb ``gate``: compare a NEW run's records with BASE; exit 1 on a regression."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from opbench.errors import UsageError

from .common import parse_threshold


def register(subparsers, common) -> None:
    _register_gate(subparsers)


def _register_gate(subparsers) -> None:
    p = subparsers.add_parser(
        "gate", help="compare two result files; exit 1 on a regression",
        description="Compare NEW results with BASE.  Exit 1 when a case that passed now fails, "
        "a supported case is now unsupported, a timed case is slower beyond --threshold "
        "with confidence (bootstrap interval of the ratio of --quantile), NEW holds a "
        "CRASH/TIMEOUT/ERROR record, NEW is empty or lacks a backend, device or case of "
        "BASE, or the two sides timed a case differently (one with perf --repeat, one "
        "without: not comparable); 0 otherwise.",
    )
    p.add_argument("base", metavar="BASE", help="baseline result file")
    p.add_argument("new", metavar="NEW", help="new result file")
    p.add_argument("--threshold", default="5%",
                   help="slowdown tolerated, e.g. 5%% or 0.05 (default: %(default)s)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="bootstrap interval level (default: %(default)s)")
    p.add_argument("--quantile", type=float, default=None,
                   help=f"compare this quantile of the samples (default: {_default_quantile()}"
                   "; 0.5 is the median, lower ones resist a loaded machine's slow samples)")
    add_backend_pair_options(p)
    p.add_argument("--allow-missing", action="store_true",
                   help="cases of BASE missing from NEW are a warning, not a failure (e.g. NEW "
                   "ran a subset); a missing backend or device, or an empty NEW, still fails")
    p.add_argument("--summary", metavar="FILE",
                   help="also write the markdown summary here (it is always appended to "
                   "$GITHUB_STEP_SUMMARY when that is set, and printed when neither is)")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML here")
    p.set_defaults(func=run_gate)


def add_backend_pair_options(p, base: str = "BASE", new: str = "NEW") -> None:
    """--base-backend/--new-backend: compare two differently named backends (shared by
    ``gate`` and ``report --against``)."""
    p.add_argument("--base-backend", metavar="NAME",
                   help=f"compare this backend's records of {base} ... (with --new-backend)")
    p.add_argument("--new-backend", metavar="NAME",
                   help=f"... with this backend's records of {new}; {base} and {new} may be "
                   "one file, e.g. the output of `opbench perf --ab A B`")


def backend_pair(args: argparse.Namespace) -> tuple[str, str] | None:
    """(base backend, new backend) to compare, None when neither option is given."""
    if not (args.base_backend or args.new_backend):
        return None
    if not (args.base_backend and args.new_backend):
        raise UsageError("--base-backend and --new-backend go together")
    return args.base_backend, args.new_backend


def paired(base: list[dict], new: list[dict], pair: tuple[str, str] | None):
    """BASE's and NEW's records, only the paired backends' (under one label) when ``pair``."""
    from opbench.perf.gate import pair_backends

    if pair is None:
        return base, new
    try:
        return pair_backends(base, new, *pair)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _default_quantile() -> float:
    from opbench.perf.stats import DEFAULT_QUANTILE

    return DEFAULT_QUANTILE


def _read(path: str) -> list[dict]:
    from opbench.harness.store import ResultFileError, read_records

    try:
        return read_records(path)
    except ResultFileError as e:
        raise UsageError(str(e)) from None


def _write_text(path: str, text: str, option: str, mode: str = "w") -> None:
    try:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, mode, encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write ({e.strerror or e})") from None


def _publish_summary(summary: str, path: str | None) -> None:
    """``--summary`` keeps a copy (an artifact); on GitHub Actions the run's page shows the
    step summary whatever --summary says, so both are written.  Printed only when neither."""
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if path:
        _write_text(path, summary, "--summary")
    if step_summary:
        _write_text(step_summary, summary, "GITHUB_STEP_SUMMARY", mode="a")
    if not (path or step_summary):
        print(summary)


def run_gate(args: argparse.Namespace) -> int:
    from opbench.perf.gate import gate
    from opbench.reports.gate_summary import gate_junit, gate_markdown, headline, problem_lines

    threshold = parse_threshold(args.threshold)
    if not 0 < args.confidence < 1:
        raise UsageError(f"--confidence {args.confidence} must be between 0 and 1")
    quantile = _default_quantile() if args.quantile is None else args.quantile
    if not 0 < quantile < 1:
        raise UsageError(f"--quantile {quantile} must be between 0 and 1")
    pair = backend_pair(args)
    base, new = paired(_read(args.base), _read(args.new), pair)
    result = gate(base, new, threshold, confidence=args.confidence, quantile=quantile,
                  allow_missing=args.allow_missing)
    _publish_summary(gate_markdown(result, args.base, args.new), args.summary)
    if args.junit:
        _write_text(args.junit, gate_junit(result), "--junit")
    for line in problem_lines(result):
        print(line)
    print(headline(result))
    return result.exit_code
