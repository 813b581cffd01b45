"""The GPU check's figures from a perf results file (see docs/gpu.md).

- ROPE, KV_ROTATE, CPY: achieved GB/s as a fraction of this device's device-to-device copy
  bandwidth (measured here: the best of several 256 MiB copies, bytes read + written, the
  same counting as the perf records' ``bytes``).
- ATTN decode (one query row): GB/s of K/V read, and the same fraction.
- ATTN prefill (many query rows): each backend's time over torch's (``scaled_dot_product_
  attention``) on the same case; < 1 is faster than SDPA.

Without a GPU (``--dry-run``) the ceiling is the host's copy bandwidth, and the figures only
show that the pipeline works.

    python benchmarks/gpu_figures.py perf.jsonl [--dry-run] > figures.md
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from opbench.harness import store

COPY_MIB = 256
MEMORY_OPS = ("ROPE", "KV_ROTATE", "CPY", "GET_ROWS", "SET_ROWS")


def device_copy_gbps(repeats: int = 10) -> float:
    """Device-to-device copy bandwidth of GPU 0 in GB/s (read + write), best of ``repeats``."""
    import cupy

    nbytes = COPY_MIB * 2**20
    src = cupy.empty(nbytes, dtype=cupy.uint8)
    dst = cupy.empty_like(src)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    best = float("inf")
    for _ in range(repeats):
        start.record()
        dst[...] = src
        end.record()
        end.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return 2 * nbytes / best / 1e9


def host_copy_gbps(repeats: int = 5) -> float:
    """The dry run's stand-in: host memcpy bandwidth (read + write), best of ``repeats``."""
    import time

    src = np.ones(64 * 2**20, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def timed(records: list[dict]) -> list[dict]:
    latest = {}
    for r in records:  # a case re-run into the file counts once: the latest wins
        if r["kind"] == "perf" and r["status"] == "OK" and (r.get("perf") or {}).get("median_ns"):
            latest[(r["backend"], r["case_id"])] = r
    return list(latest.values())


def gbps(record: dict) -> float:
    perf = record["perf"]
    return (perf.get("bytes") or 0) / perf["median_ns"]


def launch_us(record: dict) -> str:
    """The host's median time to enqueue one call (the device timer keeps it apart from the
    median, which is the GPU's work alone); "-" where the record has none; "waits" where the
    enqueue waits for the GPU (nothing hides it: the median includes host work)."""
    perf = record["perf"]
    if perf.get("launch_median_ns") is None:
        return "-"
    waits = " (waits)" if perf.get("launch_waits_for_device") else ""
    return f"{perf['launch_median_ns'] / 1e3:.1f}{waits}"


def memory_rows(records: list[dict], ceiling: float) -> list[str]:
    rows = []
    for r in sorted(records, key=lambda r: (r["op"], r["case_id"], r["backend"])):
        decode = r["op"] == "ATTN" and r["params"].get("nq") == 1
        if r["op"] in MEMORY_OPS or decode:
            what = "ATTN decode" if decode else r["op"]
            rows.append(f"| {what} | {r['backend']} | {r['case_id']} | "
                        f"{r['perf']['median_ns'] / 1e3:.1f} | {launch_us(r)} | "
                        f"{gbps(r):.1f} | {100 * gbps(r) / ceiling:.0f}% |")
    return rows


def prefill_rows(records: list[dict]) -> list[str]:
    prefill = [r for r in records if r["op"] == "ATTN" and (r["params"].get("nq") or 0) > 1]
    sdpa = {r["case_id"]: r["perf"]["median_ns"] for r in prefill if r["backend"] == "torch"}
    rows = []
    for r in sorted(prefill, key=lambda r: (r["case_id"], r["backend"])):
        if r["backend"] == "torch" or r["case_id"] not in sdpa:
            continue
        own, reference = r["perf"]["median_ns"], sdpa[r["case_id"]]
        rows.append(f"| {r['backend']} | {r['case_id']} | {own / 1e3:.1f} | "
                    f"{reference / 1e3:.1f} | {own / reference:.2f} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("perf", help="perf results (JSON Lines)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: host copy as ceiling")
    args = parser.parse_args(argv)
    records = timed(store.read_records(args.perf))
    if args.dry_run:
        ceiling, source = host_copy_gbps(), "host memcpy (dry run: no GPU)"
    else:
        ceiling, source = device_copy_gbps(), "device-to-device copy, GPU 0"
    print(f"Copy ceiling: {ceiling:.1f} GB/s ({source}, bytes read + written).\n")
    print("GPU time (median us) between two events, the host's enqueue hidden; launch us: the\n"
          "host's median time to enqueue one call; (waits): the enqueue waits for the GPU, so\n"
          "nothing hides it and the median includes the host's work after the wait.\n")
    print("| op | backend | case | median us | launch us | GB/s | of copy ceiling |\n"
          "|---|---|---|---|---|---|---|")
    print("\n".join(memory_rows(records, ceiling)) or "| (no timed memory-bound case) ||||||")
    print("\nPrefill attention against torch SDPA (time ratio; < 1 is faster):\n")
    print("| backend | case | median us | SDPA us | ratio |\n|---|---|---|---|---|")
    print("\n".join(prefill_rows(records)) or "| (no timed prefill case beside torch) ||||")
    return 0


if __name__ == "__main__":
    sys.exit(main())
