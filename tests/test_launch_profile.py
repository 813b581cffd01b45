"""benchmarks/launch_profile.py: a backend's host time per enqueue, and where it goes."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def launch_profile(benchmark_script):
    return benchmark_script("launch_profile")


def test_each_case_gets_its_mean_enqueue_time_and_its_busiest_functions(launch_profile,
                                                                         capsys):
    code = launch_profile.main(["-b", "cpu", "--sizes", "small", "-c", r"^CPY.*perm=\[0,1,2\]",
                                "--calls", "20", "--top", "60"])
    out = capsys.readouterr().out
    assert code == 0
    sections = out.split("\n## ")[1:]
    assert sections and all(s.startswith("cpu: CPY(") for s in sections)
    for section in sections:
        assert "host time per enqueue:" in section and "(mean of 20)" in section
        assert "ncalls  tottime" in section
        assert "backends/cpu/backend.py" in section  # the backend's own cpy is profiled


def test_a_pattern_no_case_matches_is_refused_by_name(launch_profile):
    with pytest.raises(SystemExit, match="no small perf case matches 'NOPE'"):
        launch_profile.main(["--sizes", "small", "-c", "NOPE"])


def test_enqueue_times_synchronize_outside_the_clock(launch_profile):
    calls, syncs = [], []
    launch_profile.enqueue_times(lambda: calls.append(1), lambda: syncs.append(len(calls)), 25)
    assert len(calls) == 25 and syncs == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25]
