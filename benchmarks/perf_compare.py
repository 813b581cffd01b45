"""Issue 6: our cpu backend side by side with ggml and torch, as throughput ratios per case.

    OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=passive PYTHONPATH=. .venv/bin/python \\
        benchmarks/perf_compare.py --run --results /tmp/issue6.jsonl

``--run`` first runs ``opbench perf -b cpu,ggml,torch -o ROPE,ATTN,CPY`` (one process, one run id)
into ``--results``; without it an existing results file is read.  A ratio is cpu throughput over
the other backend's (median times, other/cpu): 0.5 means cpu does half the work per second.
The issue's target: cpu >= 0.5 of ggml on ROPE and CPY.
"""

from __future__ import annotations

import argparse
import sys

TARGET = 0.5
TARGET_OPS = ("ROPE", "CPY")


def medians(records: list[dict]) -> dict[str, dict[str, float]]:
    """case id -> backend -> median ns, from OK perf records (the last one of a case wins)."""
    table: dict[str, dict[str, float]] = {}
    for r in records:
        if r["kind"] == "perf" and r["status"] == "OK" and r.get("perf"):
            table.setdefault(r["case_id"], {})[r["backend"]] = r["perf"]["median_ns"]
    return table


def ratio_lines(table, base: str, others: list[str]) -> list[str]:
    head = f"{base + ' us':>12s}" + "".join(f"{base + '/' + o:>12s}" for o in others)
    lines = [head + "  case"]
    for case_id, by_backend in table.items():
        if base not in by_backend:
            continue
        cells = [f"{by_backend[base] / 1e3:12.1f}"]
        for other in others:
            ns = by_backend.get(other)
            cells.append(f"{ns / by_backend[base]:12.2f}" if ns else f"{'-':>12s}")
        lines.append("".join(cells) + "  " + case_id)
    return lines


def misses(table, base: str, reference: str) -> list[str]:
    """Cases of TARGET_OPS where ``base`` has less than TARGET of ``reference``'s throughput."""
    out = []
    for case_id, by_backend in table.items():
        if case_id.split("(")[0] in TARGET_OPS and base in by_backend and reference in by_backend:
            ratio = by_backend[reference] / by_backend[base]
            if ratio < TARGET:
                out.append(f"{ratio:.2f}  {case_id}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True)
    p.add_argument("--run", action="store_true", help="run opbench perf into --results first")
    p.add_argument("--budget-ms", default="1000")
    p.add_argument("--backends", default="cpu,ggml,torch")
    args = p.parse_args(argv)
    if args.run:
        from opbench.cli.main import main as opbench

        code = opbench(["perf", "-b", args.backends, "-o", "ROPE,ATTN,CPY", "--budget-ms",
                        args.budget_ms, "--min-samples", "10", "--results", args.results])
        if code:
            return code
    from opbench.harness.store import read_records

    table = medians(read_records(args.results))
    base, *others = args.backends.split(",")
    print(f"\nthroughput ratios ({base} over each; > 1: {base} faster)")
    print("\n".join(ratio_lines(table, base, others)))
    missed = misses(table, base, "ggml") if "ggml" in others else []
    print(f"\n{base} below {TARGET:.0%} of ggml on {'/'.join(TARGET_OPS)}: "
          + ("none" if not missed else f"{len(missed)} case(s)"))
    print("\n".join("  " + m for m in missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
