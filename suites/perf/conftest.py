"""pytest-benchmark front end to the perf tables: ``pytest suites/perf --benchmark-enable``.

With benchmarks disabled (the project's default ``addopts``) each benchmark runs its call once, on
the small table, so the default ``pytest`` stays fast; enabled, the full model shapes are timed
unless ``--perf-sizes small``.  Storage and compare are pytest-benchmark's own
(``--benchmark-autosave``, ``--benchmark-compare``); ``extra_info`` carries the opbench case id,
bytes, flops and the backend's device-timer median.
"""

from __future__ import annotations


def pytest_addoption(parser):
    parser.getgroup("opbench").addoption(
        "--perf-sizes", choices=["full", "small"], default=None,
        help="perf table for suites/perf (default: full with --benchmark-enable, else small)")


def perf_sizes(config) -> str:
    chosen = config.getoption("--perf-sizes")
    if chosen:
        return chosen
    disabled = config.getoption("benchmark_disable", default=True)
    return "small" if disabled else "full"


def pytest_generate_tests(metafunc):
    if "perf_case" in metafunc.fixturenames:
        from opbench.perf.run import perf_cases

        cases = perf_cases(perf_sizes(metafunc.config))
        metafunc.parametrize("perf_case", cases, ids=[c.id for c in cases])
