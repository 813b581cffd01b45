"""The ``opbench`` command line: test-backend-ops style verbs over the case tables.

Each verb lives in its own module exposing ``register(subparsers)``; this module only builds
the parser, turns usage errors into one line and exit code 2, and never shows a traceback for
bad input.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

from .. import __version__
from .errors import UsageError

VERB_MODULES = ["cli_test", "cli_scenario", "cli_perf", "cli_report"]

EPILOG = """examples:
  opbench test                         every op on the cpu backend
  opbench test -b cpu,torch -o ROPE -p 'mode=neox' --quick
  opbench test -b my_kernels.py:MyBackend -o ATTN
  opbench support -b cpu,ggml,torch
  opbench list -o KV_ROTATE
exit codes: 0 all passed, 1 a failure, 2 a usage error"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        raise UsageError(message)


def common_options() -> argparse.ArgumentParser:
    """Options every verb that runs cases shares (DESIGN.md, CLI)."""
    common = _Parser(add_help=False)
    common.add_argument("-b", "--backend", default="cpu",
                        help="backends, comma separated: a registered name, package.module:Class"
                             " or path/file.py:Class (default: cpu)")
    common.add_argument("-o", "--op", default=None, help="ops, comma separated (default: all)")
    common.add_argument("-p", "--pattern", default=None,
                        help="regular expression matched against case ids")
    common.add_argument("--devices", type=int, default=1, help="logical devices (default: 1)")
    common.add_argument("--seed", type=int, default=0, help="input seed (default: 0)")
    common.add_argument("-j", "--jobs", type=int, default=1, help="worker processes")
    common.add_argument("--results", default=None,
                        help="append JSON Lines records to this file as each case finishes")
    common.add_argument("--output", choices=["console", "csv", "json", "junit"],
                        default="console", help="output format on stdout")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="opbench", description="Correctness and performance harness for LLM"
                     " inference ops: float64 oracles judge real backends.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"opbench {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    common = common_options()
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(name):
                continue  # verb not built yet
            raise
        if len(inspect.signature(module.register).parameters) == 2:
            module.register(subparsers, common)
        else:
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt:
        print("opbench: interrupted; records written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
