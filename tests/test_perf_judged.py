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

    class LazyPerBuffer(CpuBackend):
        name = "lazy-per-buffer"  # works once per output buffer, then leaves its answer there

        def cpy(self, src, out, perm, step=1, stream=None):
            seen = self.__dict__.setdefault("seen", set())
            if id(out) not in seen:
                super().cpy(src, out, perm, step, stream)
                seen.add(id(out))

    class Tired(CpuBackend):
        name = "tired"  # rotates the cache for its first calls, then leaves it as it is

        def kv_rotate(self, key_cache, block_indices, deltas, lut, layout, stream=None):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls <= 3:
                super().kv_rotate(key_cache, block_indices, deltas, lut, layout, stream)

    class TiredNoWrite(Tired):
        name = "tired-no-write"  # cannot write into a buffer: perf restores into fresh ones

        def implements(self, method):
            return method != "write" and super().implements(method)

    class Replay(CpuBackend):
        name = "replay"  # rotates once, then writes that first answer back on every call

        def kv_rotate(self, key_cache, block_indices, deltas, lut, layout, stream=None):
            if hasattr(self, "answer"):
                self.write(key_cache, self.answer, stream)
                return
            super().kv_rotate(key_cache, block_indices, deltas, lut, layout, stream)
            self.answer = self.to_host(key_cache)

    class Garbage(CpuBackend):
        name = "garbage"  # right the first (untimed, NaN-checked) time, zeros while timed

        def cpy(self, src, out, perm, step=1, stream=None):
            self.calls = getattr(self, "calls", 0) + 1
            super().cpy(src if self.calls == 1 else src * 0, out, perm, step, stream)
""")
ONE_CASE = ["-o", "CPY", "--sizes", "small", "-p", r"type=f16", "--budget-ms", "1",
            "--min-samples", "3", "--warmup", "1", "--no-calibrate"]


def perf_status(tmp_path, cls: str, *extra, case=ONE_CASE) -> dict:
    path = tmp_path / "lazy_backends.py"
    path.write_text(BACKENDS)
    results = tmp_path / f"{cls}{len(extra)}.jsonl"
    main(["perf", "-b", f"{path}:{cls}", *case, "--results", str(results), *extra])
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


IN_PLACE = ["--sizes", "small", "--budget-ms", "1", "--min-samples", "3", "--warmup", "1",
            "--no-calibrate"]


@pytest.mark.parametrize("fresh", [[], ["--fresh-inputs"]])
def test_in_place_outputs_are_judged_after_timing(tmp_path, fresh):
    # every timed call rotates the cache once more: the input is restored and one more call
    # judged, so a correct in-place op is OK however many times it was timed
    results = tmp_path / "in_place.jsonl"
    main(["perf", "-o", "KV_ROTATE,SET_ROWS", *IN_PLACE, "--results", str(results), *fresh])
    records = store.read_records(results)
    assert {r["op"] for r in records} == {"KV_ROTATE", "SET_ROWS"}
    assert all(r["status"] == "OK" and r["perf"]["output_judged"] for r in records), [
        r.get("reason") for r in records]


@pytest.mark.parametrize("cls", ["Tired", "TiredNoWrite"])
def test_an_in_place_op_that_stops_working_while_timed_is_an_error(tmp_path, cls):
    record = perf_status(tmp_path, cls, case=["-o", "KV_ROTATE", *IN_PLACE])
    assert record["status"] == "ERROR"
    assert record["reason"].startswith("the output of a call on restored inputs after the "
                                       "timed calls is wrong: key_cache:")


@pytest.mark.parametrize("fresh, status", [([], "OK"), (["--fresh-inputs"], "ERROR")])
def test_fresh_inputs_catch_an_in_place_op_that_replays_its_first_answer(tmp_path, fresh,
                                                                        status):
    record = perf_status(tmp_path, "Replay", *fresh, case=["-o", "KV_ROTATE", *IN_PLACE])
    assert record["status"] == status, record.get("reason")


@pytest.mark.parametrize("fresh, status", [([], "OK"), (["--fresh-inputs"], "ERROR")])
def test_an_in_process_ab_judges_each_side_and_refreshes_its_inputs(tmp_path, fresh, status):
    path = tmp_path / "lazy_backends.py"
    path.write_text(BACKENDS)
    results = tmp_path / "ab.jsonl"
    main(["perf", "--ab", "cpu", f"{path}:LazyPerBuffer", *ONE_CASE, "--epochs", "1",
          "--results", str(results), *fresh])
    records = {r["backend"]: r for r in store.read_records(results)}
    assert records["cpu"]["status"] == "OK" and records["cpu"]["perf"]["output_judged"]
    assert records["lazy-per-buffer"]["status"] == status  # the class's name


def test_an_in_process_ab_side_that_leaves_garbage_is_an_error(tmp_path):
    path = tmp_path / "lazy_backends.py"
    path.write_text(BACKENDS)
    results = tmp_path / "ab.jsonl"
    main(["perf", "--ab", "cpu", f"{path}:Garbage", *ONE_CASE, "--results", str(results)])
    records = {r["backend"]: r for r in store.read_records(results)}
    assert records["cpu"]["status"] == "OK"
    assert records["garbage"]["status"] == "ERROR"  # the class's name
    assert records["garbage"]["reason"].startswith("the output of the timed calls is")
