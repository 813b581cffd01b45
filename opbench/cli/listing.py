"""Verb ``list``: the ops with their case counts and variants, or the case ids selected."""

from __future__ import annotations

from opbench.harness.ops import SPECS

from .common import select_cases


def register(subparsers, common) -> None:
    listing = subparsers.add_parser("list", parents=[common], help="list ops or case ids")
    listing.add_argument("--quick", action="store_true", help="list the quick subset")
    listing.set_defaults(func=cmd_list)


def cmd_list(args) -> int:
    if args.op or args.pattern or args.quick:
        for case in select_cases(args, quick=args.quick):
            print(case.id)
        return 0
    for op, spec in SPECS.items():
        cases = spec.cases()
        quick = spec.quick_cases()
        print(f"{op:10s} {len(cases):6d} cases ({len(quick)} in --quick)  "
              f"variants: {', '.join(spec.variant_keys)}")
    print(f"{'total':10s} {sum(len(s.cases()) for s in SPECS.values()):6d} cases")
    return 0
