"""`opbench scenario --sweep devices=A..B`: the error per step against the number of devices."""

from __future__ import annotations

import json

from opbench.cli.main import main
from opbench.harness.scenario.config import ScenarioSpec
from opbench.harness.scenario.matrix import sweep_prompt_lens


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


def test_sweep_to_8_devices_lengthens_the_prompts_of_every_count(tmp_path, capsys):
    """Past the model's shortest prompt (6 tokens) the sweep runs every count with the same
    longer prompts (the shortest two tokens per device) and records them; within it, the
    model's own prompts and the scenario ids of a plain run."""
    results = tmp_path / "sweep.jsonl"
    assert main(["scenario", "--sweep", "devices=1..8", "--split", "ring", "--steps", "1",
                 "--layers", "2", "-q", "--results", str(results)]) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["params"]["devices"] for r in records) == list(range(1, 9))
    assert {r["status"] for r in records} == {"OK"}
    assert {tuple(r["params"]["prompt_lens"]) for r in records} == {(23, 16, 27)}
    assert all(r["case_id"].endswith(",prompts=23-16-27)") for r in records)
    assert sweep_prompt_lens("gemma3", 6) is None
    plain = ScenarioSpec(split="ring", devices=3, layers=2, steps=1)
    assert _sweep_ids("devices=1..3")[2] == plain.id


def _sweep_ids(span: str) -> list[str]:
    from opbench.cli.main import build_parser
    from opbench.cli.scenario import selected_specs

    args = build_parser().parse_args(["scenario", "--sweep", span, "--split", "ring",
                                      "--steps", "1", "--layers", "2"])
    return [spec.id for spec in selected_specs(args)]
