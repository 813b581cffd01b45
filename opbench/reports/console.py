"""One-line console rendering of perf results, in test-backend-ops' format."""

from __future__ import annotations


def _size(nbytes: float) -> str:
    return f"{nbytes / 1024:.0f} kB/run"


def _working_set(nbytes: float) -> str:
    mib = nbytes / 2**20
    if mib < 1:
        return f"{nbytes / 1024:.0f} kB"
    return f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.2g} MiB"


def _ceiling_part(perf: dict, ceiling_name: str | None) -> str:
    """`` (41% of copy bandwidth, 2 cores)``; ``, cache-resident (working set 4 MiB)`` for a
    call that ran from cache, where a fraction of the memory ceiling would mean nothing; and
    no impossible percentage for a call beyond a ceiling measured on a busy machine."""
    if perf.get("cache_resident"):
        return f", cache-resident (working set {_working_set(perf['bytes'])})"
    on_device = perf.get("device_ceilings") is not None  # a GPU's own, not the host's
    if perf.get("above_ceiling"):
        if on_device:
            return ", above the device's measured copy bandwidth"
        return ", above the calibrated ceiling (run `opbench calibrate --force` on a quiet machine)"
    if perf.get("fraction_of_ceiling") is None:
        return ""
    name = ceiling_name or ("matmul rate" if perf.get("bound") == "compute" else
                            "the device's copy bandwidth" if on_device else "copy bandwidth")
    threads = perf.get("ceiling_threads")
    if threads:
        name += f", {threads} core{'s' if threads > 1 else ''}"
    return f" ({perf['fraction_of_ceiling']:.0%} of {name})"


def format_perf_line(case_id: str, perf: dict, ceiling_name: str | None = None) -> str:
    """``OP(...): 2304 runs - 445.61 us/run - 32770 kB/run - 70.27 GB/s (41% of copy
    bandwidth, 2 cores)``; the parts whose data is missing are left out.  A device timer's
    record ends with the host's time to enqueue one call: ``- 38.10 us/enqueue`` (``, waits
    for the GPU`` where the enqueue waited for the device: then us/run includes host work)."""
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
    if rate:
        parts.append(rate + _ceiling_part(perf, ceiling_name))
    launch = perf.get("launch_median_ns")
    if launch is not None:
        waits = ", waits for the GPU" if perf.get("launch_waits_for_device") else ""
        parts.append(f"{launch / 1e3:.2f} us/enqueue{waits}")
    return f"{case_id}: " + " - ".join(parts)
