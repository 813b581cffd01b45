"""--shard I/N and `opbench merge`: a stable, disjoint, complete split by case id."""

from __future__ import annotations

import json
import re

import pytest

from opbench.cli.main import main
from opbench.harness.ops import SPECS
from opbench.harness.scenario.matrix import matrix
from opbench.harness.shards import MergeError, Shard, merge_shards, parse_shard, take_shard


@pytest.mark.parametrize("op", list(SPECS))
def test_shards_are_disjoint_and_cover_every_table(op):
    ids = [case.id for case in SPECS[op].cases()]
    for count in range(1, 8):
        parts = [take_shard(SPECS[op].cases(), Shard(i, count)) for i in range(1, count + 1)]
        part_ids = [[case.id for case in part] for part in parts]
        assert sorted(sum(part_ids, [])) == sorted(ids), f"{op} N={count}: union != table"
        assert len(set(sum(part_ids, []))) == len(ids), f"{op} N={count}: shards overlap"


def test_split_is_by_id_not_position():
    cases = SPECS["CPY"].cases()
    shard = Shard(2, 3)
    forward = {c.id for c in take_shard(cases, shard)}
    assert forward == {c.id for c in take_shard(cases[::-1], shard)}
    assert forward == {c.id for c in take_shard(cases[5:], shard)} | {
        c.id for c in take_shard(cases[:5], shard)}


def test_scenario_matrix_shards_cover_it():
    specs = matrix(steps=1)
    parts = [take_shard(specs, Shard(i, 4)) for i in range(1, 5)]
    assert sorted(s.id for part in parts for s in part) == sorted(s.id for s in specs)


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "a/b", "3", "-1/2"])
def test_bad_shard_is_refused(text):
    with pytest.raises(ValueError, match="must be I/N"):
        parse_shard(text)


def _run_shards(tmp_path, count, extra=()):
    tmp_path.mkdir(exist_ok=True)
    paths = []
    for i in range(1, count + 1):
        path = tmp_path / f"shard{i}.jsonl"
        code = main(["test", "--quick", "-q", "-o", "CPY,GET_ROWS", "--shard", f"{i}/{count}",
                     "--results", str(path), *extra])
        assert code == 0
        paths.append(path)
    return paths


def test_merge_rebuilds_the_whole_run(tmp_path, capsys):
    whole = tmp_path / "whole.jsonl"
    assert main(["test", "--quick", "-q", "-o", "CPY,GET_ROWS", "--results", str(whole)]) == 0
    paths = _run_shards(tmp_path, 3)
    merged = tmp_path / "all.jsonl"
    assert main(["merge", *map(str, paths), "-o", str(merged)]) == 0
    records = [json.loads(line) for line in merged.read_text().splitlines()]
    want = [json.loads(line) for line in whole.read_text().splitlines()]
    assert sorted((r["case_id"], r["status"]) for r in records) == sorted(
        (r["case_id"], r["status"]) for r in want)
    assert {r["shard"] for r in records} == {"1/3", "2/3", "3/3"}
    assert main(["gate", str(whole), str(merged), "--summary", str(tmp_path / "s.md")]) == 0
    assert main(["report", str(merged), "--out", str(tmp_path / "report")]) == 0


def test_merge_names_missing_shards_and_refuses_overlaps(tmp_path, capsys):
    paths = _run_shards(tmp_path, 3)
    assert main(["merge", str(paths[0]), "-o", str(tmp_path / "m.jsonl")]) == 2
    assert "missing shard(s) 2/3, 3/3" in capsys.readouterr().err
    assert main(["merge", *map(str, paths), str(paths[1]), "-o", str(tmp_path / "m.jsonl")]) == 2
    assert "shard 2/3 appears twice" in capsys.readouterr().err
    # a record relabelled into another shard's file overlaps that shard
    lines = paths[0].read_text().splitlines()
    moved = json.loads(lines[0])
    moved["shard"] = "2/3"
    paths[1].write_text(paths[1].read_text() + json.dumps(moved) + "\n")
    with pytest.raises(MergeError, match=r"overlap: .*shard2.jsonl \(shard 2/3\) holds"):
        merge_shards(paths)


def test_merge_refuses_unsharded_and_mixed_counts(tmp_path, capsys):
    whole = tmp_path / "whole.jsonl"
    assert main(["test", "--quick", "-q", "-o", "CPY", "--results", str(whole)]) == 0
    assert main(["merge", str(whole), "-o", str(tmp_path / "m.jsonl")]) == 2
    assert "records without a shard" in capsys.readouterr().err
    two = _run_shards(tmp_path / "two", 2)
    three = _run_shards(tmp_path, 3)
    with pytest.raises(MergeError, match="split the suite differently"):
        merge_shards([two[0], three[1], three[2]])


def test_shard_on_scenario_and_perf(tmp_path):
    path = tmp_path / "scen.jsonl"
    args = ["scenario", "--matrix", "-p", "split=layer,devices=2,rope_cache=on,graph_reuse=off",
            "--steps", "1", "--layers", "4", "-q", "--results", str(path)]
    for i in (1, 2):
        assert main(args + ["--shard", f"{i}/2"]) in (0, 2)  # 2: this shard holds nothing
    ids = [json.loads(line)["case_id"] for line in path.read_text().splitlines()]
    want = [s.id for s in matrix(layers=4, steps=1) if re.search(args[3], s.id)]
    assert sorted(ids) == sorted(want) and len(want) > 2
    perf = tmp_path / "perf.jsonl"
    assert main(["perf", "--sizes", "small", "-o", "CPY", "--budget-ms", "1", "--min-samples",
                 "2", "--warmup", "0", "--no-calibrate", "--shard", "1/2",
                 "--results", str(perf)]) == 0
    records = [json.loads(line) for line in perf.read_text().splitlines()]
    assert records and all(Shard(1, 2).holds(r["case_id"]) for r in records)
    assert {r["shard"] for r in records} == {"1/2"}
