"""The README's commands work as shown: every ``$ opbench ...`` line of its ```console blocks
runs (smaller time budgets, fewer repeats), exits as the block shows (1 when it shows a FAIL) and
prints every output line the block shows (lines with an elision ``...`` are not compared)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from opbench.cli.main import main
from opbench.harness.registry import parse_ref

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: only the clock changes: a shown timing command runs with a small budget and two runs a side
FASTER = {"perf": ["--budget-ms", "5", "--min-samples", "3", "--warmup", "1"]}
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


def test_the_readme_has_console_blocks_with_commands():
    assert len(BLOCKS) >= 4 and all(BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b[0][0] for b in BLOCKS])
def test_readme_console_block_works_as_shown(block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "my_backend.py").write_text(python_file(README, "my_backend.py"))
    for command, shown in block:
        argv = argv_of(command)
        why = missing_backend(argv)
        if why:
            pytest.skip(f"not installed here: {why}")
        code = main(argv)
        out, err = capsys.readouterr()
        printed = out + err
        expected = 1 if any(line.rstrip().endswith(": FAIL") for line in shown) else 0
        assert code == expected, f"{command}: exit {code}\n{printed}"
        for line in shown:
            if line.strip() and "..." not in line:
                assert line.strip() in printed, f"{command}: no line {line.strip()!r}"
    assert os.getcwd() == str(tmp_path)
