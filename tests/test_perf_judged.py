"""Perf judges what it timed: the outputs of the timed calls are compared with the float64
oracle (a backend that answers from a cache or leaves garbage gets ERROR, not a speed), and
``--fresh-inputs`` gives every sample new inputs so a cache keyed on them cannot answer."""

from __future__ import annotations

import textwrap

import pytest

from opbench.cli.main import main
from opbench.harness import store

BACKENDS = textwrap.dedent("""
    from opbench.backends.cpu import CpuBackend

    class Lazy(CpuBackend):
        name = "lazy"  # does the work once, then returns at once: the answer it left stays

        def cpy(self, src, out, perm, step=1, stream=None):
            if getattr(self, "done", False):
                return
            super().cpy(src, out, perm, step, stream)
            self.done = True

    class Garbage(CpuBackend):
        name = "garbage"  # right the first (untimed, NaN-checked) time, zeros while timed

        def cpy(self, src, out, perm, step=1, stream=None):
            self.calls = getattr(self, "calls", 0) + 1
            super().cpy(src if self.calls == 1 else src * 0, out, perm, step, stream)
""")
ONE_CASE = ["-o", "CPY", "--sizes", "small", "-p", r"type=f16", "--budget-ms", "1",
            "--min-samples", "3", "--warmup", "1", "--no-calibrate"]


def perf_status(tmp_path, cls: str, *extra) -> dict:
    path = tmp_path / "lazy_backends.py"
    path.write_text(BACKENDS)
    results = tmp_path / f"{cls}{len(extra)}.jsonl"
    main(["perf", "-b", f"{path}:{cls}", *ONE_CASE, "--results", str(results), *extra])
    [record] = store.read_records(results)
    return record


def test_garbage_left_by_the_timed_calls_is_an_error(tmp_path):
    record = perf_status(tmp_path, "Garbage")
    assert record["status"] == "ERROR"
    assert record["reason"].startswith("the output of the timed calls is wrong: out:")


@pytest.mark.parametrize("fresh, status", [([], "OK"), (["--fresh-inputs"], "ERROR")])
def test_fresh_inputs_catch_a_backend_that_answers_from_its_last_call(tmp_path, fresh, status):
    record = perf_status(tmp_path, "Lazy", *fresh)
    assert record["status"] == status


def test_a_correct_backend_times_ok_with_fresh_inputs(tmp_path):
    main(["perf", *ONE_CASE, "--fresh-inputs", "--results", str(tmp_path / "ok.jsonl")])
    [record] = store.read_records(tmp_path / "ok.jsonl")
    assert record["status"] == "OK" and record["perf"]["n"] >= 3


def test_in_place_outputs_are_timed_but_not_judged(tmp_path):
    # every timed call rotates the cache once more: the one-call oracle does not apply
    main(["perf", "-o", "KV_ROTATE", "--sizes", "small", "--budget-ms", "1", "--min-samples",
          "3", "--warmup", "1", "--no-calibrate", "--results", str(tmp_path / "kv.jsonl")])
    [record] = store.read_records(tmp_path / "kv.jsonl")
    assert record["status"] == "OK" and record["perf"]["output_judged"] is False
