"""benchmarks/perf_compare.py, the issue table's tool: its ratios and bands, and a short run."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def perf_compare(benchmark_script):
    return benchmark_script("perf_compare")


def test_a_ratio_is_the_best_peers_time_over_cpus(perf_compare):
    times = {"cpu": 100.0, "cpu-base": 400.0, "ggml": 300.0, "torch": 200.0}
    assert perf_compare.ratios(times) == (0.5, 2.0)  # old: torch over the base; new: over cpu
    assert perf_compare.ratios({"cpu": 100.0}) == (None, None)  # no peer has the op
    assert perf_compare.ratios({"cpu": 100.0, "ggml": 50.0}) == (None, 0.5)  # no base
    table = {"a": times, "b": {"cpu": 100.0, "ggml": 90.0}, "c": {"cpu": 5.0}}
    assert perf_compare.cases_below(table) == ["b"]


def test_bands_keep_every_runs_ratio_and_print_median_and_range(perf_compare, capsys):
    runs = [{"a": {"cpu": 100.0, "ggml": ggml, "cpu-base": 200.0}} for ggml in (90.0, 130.0, 80.0)]
    assert perf_compare.bands(runs) == {"a": {"old": [0.45, 0.65, 0.4], "new": [0.9, 1.3, 0.8]}}
    perf_compare.print_bands(runs)
    out = capsys.readouterr().out
    assert " 0.45 [0.40-0.65]  0.90 [0.80-1.30]  a" in out
    assert "cases below 1.0 in some run: 1; with their median below 1.0: 1" in out


def test_a_cold_run_flushes_before_every_sample_of_every_side(perf_compare, monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("ggml")
    from opbench.backends.common import host

    class Counting:
        writes = 0

        def __iadd__(self, value):
            self.writes += 1
            return self

    counter = Counting()
    monkeypatch.setattr(host, "_flush_buffer", counter)
    for name in ("GOMP_SPINCOUNT", "OPENBLAS_NUM_THREADS"):  # main sets them if unset
        monkeypatch.setenv(name, "1" if name == "OPENBLAS_NUM_THREADS" else "10000")
    assert perf_compare.main(["-p", r"ROPE.*ne=\[128,8,512\]", "--budget-ms", "2",
                              "--settle-ms", "0", "--cold"]) == 0
    out = capsys.readouterr().out
    assert "caches: evicted before every sample" in out
    [row] = [line for line in out.splitlines() if "ROPE(" in line]
    assert float(row.split()[0]) > 0  # cpu's median time, us
    # three sides (cpu, ggml, torch), each at least min_samples (10) samples, each flushed
    assert counter.writes >= 3 * 10


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--settle-ms", "nan"]])
def test_bad_arguments_are_usage_errors(perf_compare, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        perf_compare.main(argv)
    assert exit_.value.code == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_the_base_package_is_loaded_from_a_copy_named_by_its_contents(perf_compare, tmp_path,
                                                                      monkeypatch):
    """numba caches what it compiles beside the files it loaded, under that module name: the
    base's own folder must never receive a cache compiled as base_cpu."""
    import tempfile

    base = tmp_path / "base" / "cpu"
    (base / "__pycache__").mkdir(parents=True)
    (base / "__init__.py").write_text("X = 1\n")
    (base / "kernels.py").write_text("Y = 2\n")
    (base / "__pycache__" / "kernels.f-1.py311.nbi").write_bytes(b"cache of another loader")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    copy = perf_compare.base_package_copy(base)
    assert copy.is_relative_to(tmp_path / "tmp")
    assert sorted(p.name for p in copy.iterdir()) == ["__init__.py", "kernels.py"]
    assert (copy / "kernels.py").read_text() == "Y = 2\n"
    assert perf_compare.base_package_copy(base) == copy  # same files: same folder, its cache
    (base / "kernels.py").write_text("Y = 3\n")
    changed = perf_compare.base_package_copy(base)
    assert changed != copy and (changed / "kernels.py").read_text() == "Y = 3\n"
    assert not list((tmp_path / "tmp").rglob("*partial*"))  # each copy renamed into place
