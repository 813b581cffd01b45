"""`opbench scenario --sweep devices=A..B`: the error per step against the number of devices."""

from __future__ import annotations

import json

from opbench.cli.main import main


def test_sweep_records_error_per_step_for_every_device_count(tmp_path, capsys):
    results = tmp_path / "sweep.jsonl"
    code = main(["scenario", "--sweep", "devices=1..3", "--steps", "1", "--layers", "2", "-q",
                 "--results", str(results)])
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert code == 0
    assert sorted((r["params"]["split"], r["params"]["devices"]) for r in records) == sorted(
        (split, n) for split in ("ring", "zigzag", "stripe") for n in (1, 2, 3))
    for record in records:
        steps = record["scenario"]["per_step"]
        assert [s["step"] for s in steps] == [0, 1]
        assert all(0 < s["nmse"] < 1e-9 and s["max_rel"] > 0 for s in steps)


def test_sweep_of_one_split_and_bad_ranges(tmp_path, capsys):
    results = tmp_path / "sweep.jsonl"
    assert main(["scenario", "--sweep", "devices=2..3", "--split", "zigzag", "--steps", "1",
                 "--layers", "2", "-q", "--results", str(results)]) == 0
    assert {json.loads(x)["params"]["split"] for x in results.read_text().splitlines()} == {
        "zigzag"}
    for bad in ("devices=0..3", "devices=3..2", "layers=1..2", "devices=2"):
        assert main(["scenario", "--sweep", bad]) == 2
        assert "must be devices=A..B" in capsys.readouterr().err


def test_sweep_past_the_shortest_prompt_is_a_usage_error(capsys):
    """A sequence split needs a token of the shortest prompt per device: devices=1..8 names the
    limit in one line instead of a traceback."""
    assert main(["scenario", "--sweep", "devices=1..8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opbench: error: --sweep devices=1..8:") and "must be <= 6" in err
