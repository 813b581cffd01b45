"""The ``opbench`` command line: test-backend-ops style verbs over the case tables.

Each verb lives in its own module of this package exposing ``register(subparsers, common)``;
this module only builds the parser, turns usage errors into one line and exit code 2, and never
shows a traceback for bad input.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import os
import signal
import sys

from opbench import __version__
from opbench.errors import BackendSetupError, UsageError

from .common import Parser, common_options

VERB_MODULES = ["test", "support", "listing", "doctor", "scenario", "perf", "report", "gate",
                "calibrate", "db", "history", "merge", "models"]

EPILOG = """examples:
  opbench test                         every op on the cpu backend
  opbench test -b cpu,torch -o ROPE -p 'mode=neox' --quick
  opbench test -b my_kernels.py:MyBackend -o ATTN
  opbench support -b cpu,ggml,torch
  opbench list -o KV_ROTATE
exit codes: 0 all passed, 1 a failure, 2 a usage error"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="opbench", description="Correctness and performance harness for LLM"
                    " inference ops: float64 oracles judge real backends.", epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"opbench {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    common = common_options()
    for name in VERB_MODULES:
        importlib.import_module(f".{name}", __package__).register(subparsers, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    report_fatal_signals()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"opbench: error: {exc}", file=sys.stderr)
        return 2
    except BackendSetupError as exc:  # where a verb cannot go on without that backend (--ab)
        print(f"opbench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("opbench: interrupted; records written so far are kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_went_away()


def report_fatal_signals() -> None:
    """A backend that crashes the process (SIGSEGV, SIGABRT, ...) outside --isolate leaves the
    shell's one word ("Aborted"); Python's fault handler prints every thread's stack first, so
    the op and the backend's line that crashed are named.  (``--isolate`` or ``-j`` turn a crash
    into a CRASH record and go on.)  Left as it is where a caller enabled it (pytest does) or
    stderr is no file."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, OSError):  # stderr replaced by an object without a fd
        pass


def _reader_went_away() -> int:
    """stdout's reader closed the pipe (``opbench list | head -1``): stop quietly, as a tool
    killed by SIGPIPE would, and point stdout at /dev/null so the exit-time flush cannot fail
    again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
