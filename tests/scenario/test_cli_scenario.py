"""``opbench scenario``: exit codes, console lines, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opbench.cli.main import main

ZOO = Path(__file__).resolve().parents[1] / "bugzoo" / "scenario_bugs.py"


def test_single_scenario_passes_and_writes_a_scenario_record(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    code = main(["scenario", "--split", "layer", "--devices", "2", "--evict", "on",
                 "--graph-reuse", "on", "--steps", "2", "--results", str(results)])
    out = capsys.readouterr().out
    assert code == 0
    assert "SCENARIO(split=layer,devices=2,rope_cache=on,graph_reuse=on,evict=on" in out
    assert "1/1 tests passed" in out and "Backend cpu: OK" in out
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["kind"] == "scenario" and record["status"] == "OK"
    assert record["scenario"]["split"] == "layer" and record["scenario"]["divergence"] is None
    assert record["scenario"]["steps_run"] == 3
    assert 0 < record["metrics"]["nmse"] < 1e-9


def test_divergence_exits_1_naming_step_layer_device_and_metric(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    code = main(["scenario", "-b", f"{ZOO}:RopeCacheLayerZero", "--split", "layer",
                 "--devices", "2", "--steps", "1", "--results", str(results)])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out
    assert "first divergence at step 0, layer 3, device 1: nmse=" in out
    record = json.loads(results.read_text())
    assert record["status"] == "FAIL"
    assert record["scenario"]["divergence"]["layer"] == "3"
    assert record["scenario"]["divergence"]["device"] == 1
    assert record["reason"] == record["errors"][0]  # csv, JUnit and reports read the reason
    assert record["reason"].startswith("first divergence at step 0, layer 3, device 1")


def test_usage_errors_exit_2(capsys):
    assert main(["scenario", "--split", "none", "--devices", "2"]) == 2
    assert "split='none' runs on 1 device" in capsys.readouterr().err
    assert main(["scenario", "--split", "head", "--devices", "5"]) == 2
    assert "devices=5 must be <= n_heads=4" in capsys.readouterr().err
    assert main(["scenario", "--split", "diagonal"]) == 2
    assert main(["scenario", "--steps", "0"]) == 2


def test_a_sweep_refuses_the_flags_it_would_ignore(capsys):
    for extra, message in ((["--split", "head"], "--split head has no sweep"),
                           (["--matrix"], "drop --matrix"), (["--devices", "3"], "drop --devices")):
        assert main(["scenario", "--sweep", "devices=1..2", *extra]) == 2
        assert message in capsys.readouterr().err


def test_a_model_configs_unread_fields_are_named(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "rope_scalling": {"rope_type": "linear", "factor": 2.0}}))
    assert main(["scenario", "--model", str(path), "--layers", "2", "--steps", "1", "-q"]) == 0
    assert "fields not used: rope_scalling" in capsys.readouterr().err


def test_json_output_lists_the_records(capsys):
    assert main(["scenario", "--split", "ring", "--devices", "2", "--steps", "1",
                 "--output", "json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["status"] == "OK" and record["op"] == "SCENARIO"


def test_backend_without_scenario_ops_is_unsupported_not_failed(tmp_path, capsys):
    module = tmp_path / "bare.py"
    module.write_text("from opbench.protocol import Backend\n"
                      "class Bare(Backend):\n    name = 'bare'\n")
    assert main(["scenario", "-b", f"{module}:Bare", "--steps", "1", "--output", "json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["status"] == "UNSUPPORTED"
    assert "bare does not implement matmul" in record["reason"]


def test_matrix_pattern_picks_scenarios_by_id(capsys):
    code = main(["scenario", "--matrix", "-p", r"split=ring,devices=2,.*evict=on,delay=on",
                 "--steps", "1", "--output", "json"])
    records = json.loads(capsys.readouterr().out)
    assert code == 0 and len(records) == 4  # rope_cache x graph_reuse
    assert all("evict=on,delay=on" in r["case_id"] for r in records)
    assert main(["scenario", "--matrix", "-p", "split=diagonal"]) == 2


def test_a_backend_that_raises_is_an_error_record_and_exit_1(tmp_path, capsys):
    module = tmp_path / "broken.py"
    module.write_text("from opbench.backends.cpu import CpuBackend\n"
                      "class Broken(CpuBackend):\n"
                      "    def attn_merge(self, *args, **kwargs):\n"
                      "        raise RuntimeError('merge kernel missing')\n")
    code = main(["scenario", "-b", f"{module}:Broken", "--split", "ring", "--devices", "2",
                 "--steps", "1", "--output", "junit"])
    out = capsys.readouterr().out
    assert code == 1
    assert "<testsuite" in out and "merge kernel missing" in out
    code = main(["scenario", "-b", f"{module}:Broken", "--split", "ring", "--devices", "2",
                 "--steps", "1", "--output", "json"])
    (record,) = json.loads(capsys.readouterr().out)
    assert record["status"] == "ERROR" and record["device"] == "2 device(s)"  # as an OK's
    assert any("in attn_merge" in line for line in record["errors"][1:])  # where it raised


#: aborts in the ring split only (attn_merge joins the partial attentions of sequence splits)
#: and hangs whenever it is given 3 devices: every other scenario is healthy
CRASHING = """
import os
import time
from opbench.backends.cpu import CpuBackend

class Crashy(CpuBackend):
    name = "crashy"

    def attn_merge(self, *args, **kwargs):
        os.abort()

    def devices(self, n=1):
        if n == 3:
            time.sleep(60)
        return super().devices(n)
"""


def test_matrix_records_a_crashed_and_a_hung_scenario_and_goes_on(tmp_path, capsys):
    module = tmp_path / "crashy.py"
    module.write_text(CRASHING)
    results = tmp_path / "r.jsonl"
    pattern = (r"split=(none,devices=1|layer,devices=[23]|ring,devices=2),rope_cache=on,"
               r"graph_reuse=off,evict=off,delay=off,model=gemma3,")
    # --timeout counts from the moment a worker begins a scenario: 20 s is ample for one step
    # of 4 layers even on a loaded machine, and is what the hung scenario costs
    code = main(["scenario", "--matrix", "-p", pattern, "-b", f"{module}:Crashy", "-j", "2",
                 "--timeout", "20", "--steps", "1", "--layers", "4", "--results", str(results)])
    out = capsys.readouterr().out
    records = {r["case_id"].split(",rope_cache")[0]: r
               for r in map(json.loads, results.read_text().splitlines())}
    statuses = {case: r["status"] for case, r in records.items()}
    assert statuses == {"SCENARIO(split=none,devices=1": "OK",
                        "SCENARIO(split=layer,devices=2": "OK",
                        "SCENARIO(split=layer,devices=3": "TIMEOUT",
                        "SCENARIO(split=ring,devices=2": "CRASH"}
    assert code == 1 and "CRASH" in out and "TIMEOUT" in out
    crashed = records["SCENARIO(split=ring,devices=2"]
    assert crashed["kind"] == "scenario" and crashed["backend"] == "crashy"
    assert "worker process died" in crashed["reason"]
    assert crashed["scenario"]["split"] == "ring"


def test_rank_faults_and_delays_must_name_a_rank_and_step_the_scenarios_have(capsys):
    pytest.importorskip("torch.distributed")
    base = ["scenario", "--split", "layer", "--devices", "2", "--ranks", "--steps", "2"]
    for extra, message in ((["--inject-fault", "raise:5:0"], "ranks 0..1 and steps 0..2"),
                           (["--inject-fault", "exit:1:9"], "ranks 0..1 and steps 0..2"),
                           (["--delay-ranks", "7", "--delay", "on"], "ranks 0..1"),
                           (["--delay-ranks", "1"], "add --delay on"),
                           (["--isolate"], "drop -j, --executor and --isolate")):
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
