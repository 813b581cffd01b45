"""benchmarks/copy_bound.py: the memory-bound copy and the ceiling's own copy, as shares of the
calibrated ceiling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from opbench.harness.records import cpu_model
from opbench.perf.timing import Samples


@pytest.fixture(scope="module")
def copy_bound(benchmark_script):
    return benchmark_script("copy_bound")


def test_a_line_gives_median_and_best_as_shares_of_the_ceiling(copy_bound):
    # 1 GB a call: 40 ms (25 GB/s) at the median, 20 ms (50 GB/s) at best, ceiling 50 GB/s
    taken = Samples(np.array([40_000_000, 20_000_000, 60_000_000], np.int64), 1, 10.0)
    header, line = copy_bound.report({"copy": taken}, 10**9, 50.0)
    assert header.split()[:2] == ["subject", "n"]
    assert line.split() == ["copy", "3", "25.0", "50.0", "50%", "100%"]


def test_a_short_run_times_the_op_beside_the_ceilings_copies(copy_bound, tmp_path, monkeypatch,
                                                            capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    ceilings = {"copy_gbps": 100.0, "matmul_gflops": 100.0, "copies": ["np.copyto"],
                "one_core": {"copy_gbps": 50.0, "matmul_gflops": 50.0},
                "all_cores": {"copy_gbps": 100.0, "matmul_gflops": 100.0, "threads": 2}}
    (cache / "ceilings.json").write_text(json.dumps({cpu_model(): ceilings}))
    monkeypatch.setenv("OPBENCH_CACHE_DIR", str(cache))  # no calibration in a unit test
    assert copy_bound.main(["--budget-ms", "1", "--min-samples", "2", "--cold"]) == 0
    out = capsys.readouterr().out
    assert "128 MiB moved a call" in out and "ceiling 100.0 GB/s" in out
    assert "caches evicted before every sample" in out
    rows = {line[:34].strip(): line.split()[-4:] for line in out.splitlines()[2:]}
    assert "cpu backend CPY (perf's timer)" in rows and "np.copyto copy, split" in rows
    for median_gbps, best_gbps, median_share, best_share in rows.values():
        assert 0 < float(median_gbps) <= float(best_gbps)
        # against a 100 GB/s ceiling the share in % is the rate (rounded to 1 and to 0.1)
        assert abs(float(median_share.rstrip("%")) - float(median_gbps)) <= 0.6
        assert abs(float(best_share.rstrip("%")) - float(best_gbps)) <= 0.6
