"""The README's commands work as shown: every ``$ opbench ...`` line of its ```console blocks
runs (smaller time budgets, fewer repeats), exits as the block shows (1 when it shows a FAIL) and
prints every output line the block shows (lines with an elision ``...`` are not compared).  The
same holds for docs/ci.md, and the opbench steps of its workflow (docs/ci/perf-gate.yml) run on
the small table.  Commands run in a folder where ``base`` and ``head`` are checkouts (links to
this one), as in that workflow."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from opbench.cli.main import main
from opbench.harness.registry import parse_ref

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI_DOC = (ROOT / "docs" / "ci.md").read_text(encoding="utf-8")
WORKFLOW = (ROOT / "docs" / "ci" / "perf-gate.yml").read_text(encoding="utf-8")

#: only the clock changes: a shown timing command runs with a small budget and two runs a side
FASTER = {"perf": ["--budget-ms", "20", "--min-samples", "20", "--warmup", "1"]}
FEWER_REPEATS = {"--repeat": "2"}


def console_blocks(text: str) -> list[list[tuple[str, list[str]]]]:
    """Each ```console block as [(command, shown output lines)]."""
    blocks = []
    for body in re.findall(r"^```console\n(.*?)^```", text, flags=re.S | re.M):
        commands: list[tuple[str, list[str]]] = []
        for line in body.splitlines():
            if line.startswith("$ "):
                commands.append((line[2:], []))
            elif commands:
                commands[-1][1].append(line)
        blocks.append(commands)
    return blocks


def python_file(text: str, name: str) -> str:
    """The ```python block that starts with ``# NAME``."""
    for body in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        if body.startswith(f"# {name}\n"):
            return body
    raise AssertionError(f"README has no python block for {name}")


def argv_of(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    assert words[0] == "opbench", command
    argv = words[1:]
    for i, word in enumerate(argv[:-1]):
        if word in FEWER_REPEATS:
            argv[i + 1] = FEWER_REPEATS[word]
    return argv + FASTER.get(argv[0], [])


def ab_results_file(argv: list[str]) -> Path | None:
    """The results file of a ``perf --ab`` command, else None."""
    if argv[0] != "perf" or "--ab" not in argv or "--results" not in argv:
        return None
    return Path(argv[argv.index("--results") + 1])


def read_as_one_clock(path: Path) -> None:
    """Give each head record of an A/A ``--ab`` file its base record's timings.

    Both sides run this same tree, so any difference between them is this machine's noise:
    a burst of load during one side's slices of a 20 ms budget read as a regression past 50%
    in CI (ROPE [64, 4, 16], and a permuted copy before it).  These tests check that the shown
    commands work and print what is shown; whether the gate's verdicts hold on real timings is
    the statistics' tests' and docs/ci.md's proofs' concern.  So the gate here reads one clock
    for both sides and must find every case unchanged."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def case(record: dict) -> tuple[str, str, str]:
        return record["backend"].rpartition("@")[0], record["device"], record["case_id"]

    base = {case(r): r["perf"] for r in records if r["backend"].endswith("@base")}
    heads = [r for r in records if r["backend"].endswith("@head")]
    assert heads and sorted(map(case, heads)) == sorted(base), f"{path}: sides differ"
    for record in heads:
        record["perf"] = base[case(record)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def missing_backend(argv: list[str]) -> str | None:
    """A backend the command names that this install lacks (the README shows a full install)."""
    if "-b" not in argv:
        return None
    for ref in argv[argv.index("-b") + 1].split(","):
        if ref.endswith(":MyCopy") or ".py:" in ref:
            continue
        ok, why = parse_ref(ref).cls.available()
        if not ok and ref not in ("cupy",):  # the README shows cupy unavailable (no GPU)
            return f"{ref}: {why}"
    return None


BLOCKS = console_blocks(README)
CI_BLOCKS = console_blocks(CI_DOC)


def test_the_readme_has_console_blocks_with_commands():
    assert len(BLOCKS) >= 4 and all(BLOCKS)
    assert CI_BLOCKS and all(CI_BLOCKS)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder like the README's and the workflow's: base and head checkouts, tests, a
    user backend file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    for name in ("base", "head"):
        (tmp_path / name).symlink_to(ROOT)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "my_backend.py").write_text(python_file(README, "my_backend.py"))
    yield tmp_path
    assert os.getcwd() == str(tmp_path)


@pytest.mark.parametrize("block", BLOCKS + CI_BLOCKS,
                         ids=[b[0][0] for b in BLOCKS] + [f"ci.md: {b[0][0]}" for b in CI_BLOCKS])
def test_readme_console_block_works_as_shown(block, workspace, capsys):
    for command, shown in block:
        argv = argv_of(command)
        why = missing_backend(argv)
        if why:
            pytest.skip(f"not installed here: {why}")
        code = main(argv)
        if ab_results_file(argv):
            read_as_one_clock(ab_results_file(argv))
        out, err = capsys.readouterr()
        printed = out + err
        expected = 1 if any(line.rstrip().endswith(": FAIL") for line in shown) else 0
        assert code == expected, f"{command}: exit {code}\n{printed}"
        for line in shown:
            if line.strip() and "..." not in line:
                assert line.strip() in printed, f"{command}: no line {line.strip()!r}"


def workflow_commands() -> list[str]:
    return re.findall(r"^\s*run: (opbench .*)$", WORKFLOW, flags=re.M)


def test_the_workflow_checks_out_base_and_head_and_gates():
    assert re.search(r"path: head\n", WORKFLOW)
    assert re.search(r"ref: \$\{\{ github.event.pull_request.base.sha \}\}\s+path: base\n",
                     WORKFLOW)
    assert [c.split()[1] for c in workflow_commands()] == ["perf", "gate"]


def test_the_workflow_steps_run_here_on_the_small_table(workspace, capsys):
    for command in workflow_commands():
        argv = argv_of(command)
        if argv[0] == "perf":
            argv += ["--sizes", "small", "-o", "ROPE,CPY"]
        assert main(argv) == 0, f"{command}\n{capsys.readouterr()}"
        if ab_results_file(argv):
            read_as_one_clock(ab_results_file(argv))
    assert "opbench gate passed" in capsys.readouterr().out
