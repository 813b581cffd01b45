"""The result store: JSON Lines written record by record, validated on read, flattened."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from opbench.harness import store
from opbench.harness.records import environment, make_record


def _record(**overrides) -> dict:
    fields = dict(
        kind="test", backend="cpu", op="ROPE", case_id="ROPE(type=f32,ne=[8,2,4])",
        status="OK", run_id="run-1", device="cpu:0", params={"n_dims": 4, "mode": "neox"},
        dtype="f32", metrics={"nmse": 1e-9, "threshold": 1e-7}, env={"python": "3.11"},
    )
    return make_record(**{**fields, **overrides})


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "deep" / "dir" / "results.jsonl"  # parent dirs are created
    records = [_record(), _record(case_id="ROPE(b)", status="FAIL", errors=["nan at 3"])]
    with store.ResultWriter(path) as writer:
        for record in records:
            writer.write(record)
    assert store.read_records(path) == records
    assert writer.count == 2


def test_writer_appends_and_flushes_each_record(tmp_path):
    path = tmp_path / "r.jsonl"
    with store.ResultWriter(path) as writer:
        writer.write(_record(case_id="a"))
        # readable before the writer is closed: an interrupted run keeps finished records
        assert [r["case_id"] for r in store.read_records(path)] == ["a"]
    with store.ResultWriter(path) as writer:
        writer.write(_record(case_id="b"))
    assert [r["case_id"] for r in store.read_records(path)] == ["a", "b"]


def test_records_survive_a_killed_process(tmp_path):
    """A process that dies mid-run (os._exit: no cleanup, no close) leaves its records."""
    path = tmp_path / "killed.jsonl"
    script = textwrap.dedent(f"""
        import os
        from opbench.harness import store
        from opbench.harness.records import make_record
        writer = store.ResultWriter({str(path)!r})
        writer.open()
        for i in range(3):
            writer.write(make_record(kind="test", backend="cpu", op="CPY",
                case_id=f"CPY({{i}})", status="OK", run_id="r", env={{}}))
        os._exit(1)
    """)
    subprocess.run([sys.executable, "-c", script], check=False, cwd=str(tmp_path),
                   env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    assert [r["case_id"] for r in store.read_records(path)] == ["CPY(0)", "CPY(1)", "CPY(2)"]


def test_numpy_values_are_stored_as_plain_json(tmp_path):
    path = tmp_path / "r.jsonl"
    record = _record(metrics={"nmse": np.float32(0.5), "n_bad": np.int64(3)},
                     params={"ne": np.array([8, 2, 4]), "shape": (1, 2)})
    with store.ResultWriter(path) as writer:
        writer.write(record)
    back = store.read_records(path)[0]
    assert back["metrics"] == {"nmse": 0.5, "n_bad": 3}
    assert back["params"] == {"ne": [8, 2, 4], "shape": [1, 2]}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "malformed JSON"),
        ('["a list"]', "must be a JSON object"),
        ('{"schema": 1, "kind": "test"}', "missing required field(s) run_id, backend"),
        ('{"schema": 2, "kind": "test", "run_id": "r", "backend": "cpu", "op": "X",'
         ' "case_id": "X", "status": "OK"}', "schema=2 is newer"),
        ('{"schema": 1, "kind": "bench", "run_id": "r", "backend": "cpu", "op": "X",'
         ' "case_id": "X", "status": "OK"}', "kind='bench' must be one of"),
        ('{"schema": 1, "kind": "test", "run_id": "r", "backend": "cpu", "op": "X",'
         ' "case_id": "X", "status": "PASSED"}', "status='PASSED' must be one of"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_record())
    path.write_text(f"{good}\n\n{line}\n")  # blank line 2 is skipped; the bad one is line 3
    with pytest.raises(store.ResultFileError) as info:
        store.read_records(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def test_missing_file_is_a_result_file_error(tmp_path):
    with pytest.raises(store.ResultFileError, match="cannot read results file"):
        store.read_records(tmp_path / "nope.jsonl")


def test_make_record_and_writer_reject_bad_records(tmp_path):
    with pytest.raises(ValueError, match="status='MAYBE'"):
        _record(status="MAYBE")
    with store.ResultWriter(tmp_path / "r.jsonl") as writer:
        with pytest.raises(ValueError, match="missing required field"):
            writer.write({"schema": 1})


def test_old_records_get_defaults_for_optional_fields(tmp_path):
    path = tmp_path / "minimal.jsonl"
    path.write_text(json.dumps({"schema": 1, "kind": "test", "run_id": "r", "backend": "cpu",
                                "op": "CPY", "case_id": "CPY()", "status": "OK"}) + "\n")
    record = store.read_records(path)[0]
    assert record["perf"] is None and record["errors"] == [] and record["params"] == {}


def test_load_results_flattens_into_columns(tmp_path):
    perf = {"samples_ns": [10, 12, 11], "median_ns": 11.0, "iqr_ns": 1.0, "n": 3}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with store.ResultWriter(a) as writer:
        writer.write(_record())
    with store.ResultWriter(b) as writer:
        writer.write(_record(kind="perf", perf=perf,
                             scenario={"split": "layer", "toggles": {"rope_cache": True}}))
    df = store.load_results([a, b])
    assert len(df) == 2
    assert list(df["param.mode"]) == ["neox", "neox"]
    assert df["metric.nmse"].iloc[0] == pytest.approx(1e-9)
    assert df["perf.median_ns"].iloc[1] == 11.0 and df["perf.samples_ns"].iloc[1] == [10, 12, 11]
    assert df["scenario.toggles.rope_cache"].iloc[1] is True
    assert list(df["source"]) == [str(a), str(b)]
    assert df["env.python"].iloc[0] == "3.11"


@pytest.mark.parametrize("wheel", ["cupy-cuda13x", "cupy-cuda12x", "cupy"])
def test_the_cupy_version_is_read_from_any_of_its_wheels(monkeypatch, wheel):
    """CuPy's wheel is named per CUDA major; the H200 run's records said 'not recorded' for
    its cupy-cuda13x."""
    from importlib import metadata

    from opbench.harness import records

    def version(name):
        if name == wheel:
            return "14.2.0"
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    assert records.installed_version(*records.VERSIONED["cupy"]) == "14.2.0"


def test_environment_holds_versions_and_backend_info():
    env = environment({"mode": "threads"})
    assert env["numpy"] == np.__version__
    assert env["python"].count(".") == 2
    assert env["cpu_model"]
    assert env["backend_info"] == {"mode": "threads"}
    # the static part is cached, the backend part is not shared between calls
    assert environment()["backend_info"] == {}
