"""Verb ``list``: the ops with their case counts and variants, or the case ids selected."""

from __future__ import annotations

from opbench.harness.cases import format_value
from opbench.harness.ops import SPECS

from .common import (
    add_large_option,
    common_options,
    model_option,
    parse_ops,
    refuse_unused,
    select_cases,
)

UNUSED = ("-b", "--devices", "-j", "--results", "--output")


def register(subparsers, common) -> None:
    listing = subparsers.add_parser("list", parents=[common_options(UNUSED)],
                                    help="list ops or case ids")
    listing.add_argument("--quick", action="store_true", help="list the quick subset")
    listing.add_argument("--coverage", action="store_true",
                         help="per op: axes, values per axis, value pairs possible and "
                              "declared impossible, and the share the full and --quick "
                              "tables cover")
    model_option(listing)
    add_large_option(listing, "list")
    listing.set_defaults(func=cmd_list)


def cmd_list(args) -> int:
    refuse_unused(args, "list", list(UNUSED),
                  " (it lists case ids, which are the same for every backend)")
    if not args.quick:
        refuse_unused(args, "list", ["--seed"], " without --quick (only the quick subset is"
                      " seeded)")
    if args.coverage:
        return print_coverage(args)
    if args.op or args.pattern or args.quick or args.model or args.large:
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


def print_coverage(args) -> int:
    for op in parse_ops(args.op):
        spec = SPECS[op]
        full, quick = spec.cases(), spec.quick_cases()
        cov_full, cov_quick = spec.coverage(full), spec.coverage(quick)
        print(f"{op}: strength {spec.strength}")
        for name, values in spec.axis_values().items():
            print(f"  axis {name} ({len(values)}): {_values(values)}")
        print(f"  pairs possible {cov_full.possible}, declared impossible "
              f"{cov_full.impossible}; covered: full {cov_full.fraction:.1%} "
              f"({len(full)} cases), --quick {cov_quick.fraction:.1%} ({len(quick)} cases)")
        for rule in spec.impossible:
            print(f"  impossible: {rule.a} {_values(rule.a_values)} with {rule.b} "
                  f"{_values(rule.b_values)}: {rule.reason}")
    return 0


def _values(values) -> str:
    return "{" + ", ".join(format_value(v) if v is not None else "-" for v in values) + "}"
