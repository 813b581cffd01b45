"""One-line console rendering of perf results, in test-backend-ops' format."""

from __future__ import annotations


def _size(nbytes: float) -> str:
    return f"{nbytes / 1024:.0f} kB/run"


def format_perf_line(case_id: str, perf: dict, ceiling_name: str | None = None) -> str:
    """``OP(...): 2304 runs - 445.61 us/run - 32770 kB/run - 70.27 GB/s (41% of copy
    bandwidth)``; the parts whose data is missing are left out."""
    parts = [f"{perf['n']} runs", f"{perf['median_ns'] / 1e3:.2f} us/run"]
    if perf.get("bytes"):
        parts.append(_size(perf["bytes"]))
    bound = perf.get("bound")
    if bound == "compute" and perf.get("gflops"):
        rate = f"{perf['gflops']:.2f} GFLOP/s"
    elif perf.get("gbps"):
        rate = f"{perf['gbps']:.2f} GB/s"
    else:
        rate = ""
    if rate and perf.get("fraction_of_ceiling") is not None:
        name = ceiling_name or ("matmul rate" if bound == "compute" else "copy bandwidth")
        rate += f" ({perf['fraction_of_ceiling']:.0%} of {name})"
    if rate:
        parts.append(rate)
    return f"{case_id}: " + " - ".join(parts)
