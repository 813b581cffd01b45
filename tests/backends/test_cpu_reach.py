"""Proof of reach: the case tables alone execute every branch of the cpu backend's op code.

The --quick tables of every op (a subset of the full tables) run on the cpu backend under
coverage.py in a child process, once with the default options and once with each option that
switches a path (``rope_cache=off``, ``jit=off``).  Every branch of ``kernels.py`` and
``rope_cache.py`` must be taken, except the ones listed in EXCLUDED with their reasons.  The
numba loop bodies in ``jit.py`` are compiled, so coverage cannot see them; the tests in
test_cpu_jit.py compare them with the NumPy paths instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OP_CODE = ("opbench/backends/cpu/kernels.py", "opbench/backends/cpu/rope_cache.py")

_ARGUMENT_CHECK = ("a data-dependent argument check: the tables feed valid indices; "
                   "tests/backends/test_cpu_kernels.py feeds invalid ones")
#: (file, source line that starts the branch) -> why no table takes both ways
EXCLUDED = {
    ("kernels.py", "if len(q_pos) == 0:"): "defensive: attend never gets an empty block",
    ("kernels.py", "if rows != slice(None):"):
        "defensive: attend narrows PagedRows' heads only as [:, lo:hi] (test_cpu_kernels.py "
        "feeds it other indices)",
    ("kernels.py", "if step != 1:"):
        "defensive: attend reads PagedRows' keys in contiguous tiles (test_cpu_kernels.py "
        "feeds it a step)",
    ("kernels.py", "if slopes is None:"):
        "attend's default for callers without precomputed ALiBi slopes (the bug zoo's patched "
        "kernels); the backend's own call always passes them",
    ("kernels.py", "if q_start[0] != 0 or q_start[-1] != total_q or np.any(np.diff(q_start) "
                   "< 0):"): _ARGUMENT_CHECK,
    ("kernels.py", "if np.any(seq_lens < 0) or np.any(seq_lens > block_table.shape[1] * "
                   "block_size):"): _ARGUMENT_CHECK,
    ("kernels.py", "if np.any(np.diff(q_start) > seq_lens):"): _ARGUMENT_CHECK,
    ("kernels.py", "if np.any((used < 0) | (used >= num_blocks)):"): _ARGUMENT_CHECK,
    ("kernels.py", "if np.any((block_indices < 0) | (block_indices >= num_blocks)):"):
        _ARGUMENT_CHECK,
    ("kernels.py", "if len(np.unique(block_indices)) != len(block_indices):"): _ARGUMENT_CHECK,
    ("kernels.py", "if np.any((deltas < 0) | (deltas >= lut_rows)):"): _ARGUMENT_CHECK,
    ("kernels.py", "if np.any((slots < -1) | (slots >= len(dst))):"): _ARGUMENT_CHECK,
    ("kernels.py", "if len(np.unique(slots[keep])) != int(keep.sum()):"): _ARGUMENT_CHECK,
    ("kernels.py", "if np.any((rows < 0) | (rows >= len(src))):"): _ARGUMENT_CHECK,
    ("rope_cache.py", "if p.n_ctx_orig <= 0:"): _ARGUMENT_CHECK,
    ("rope_cache.py", "if len(self._tables) > self.max_tables:"):
        "eviction needs more than 64 RoPE parameter sets on one device: the full ROPE table "
        "has them, --quick not",
}

CHILD = """
import json, sys, coverage
cov = coverage.Coverage(branch=True, data_file=None, include=[f"*/{{f}}" for f in {files!r}])
cov.start()
from opbench.backends.cpu import CpuBackend
from opbench.harness.ops import SPECS
from opbench.harness.runner import run_case
bad = []
for options, ops in [({{}}, list(SPECS)), ({{"rope_cache": False}}, ["ROPE"]),
                     ({{"jit": False}}, ["ROPE", "CPY"])]:
    backend = CpuBackend(**options)
    backend.devices(1)
    for op in ops:
        for case in SPECS[op].quick_cases():
            record = run_case(backend, case)
            if record["status"] != "OK":
                bad.append(case.id)
    backend.close()
cov.stop()
cov.json_report(outfile=sys.argv[1])
print(json.dumps(bad))
"""


def _missing_branches(tmp_path) -> tuple[dict[tuple[str, str], list], list]:
    report = tmp_path / "coverage.json"
    run = subprocess.run([sys.executable, "-c", CHILD.format(files=OP_CODE), str(report)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    not_ok = json.loads(run.stdout.strip().splitlines()[-1])
    missing = {}
    for name, data in json.loads(report.read_text())["files"].items():
        lines = (ROOT / name).read_text().splitlines()
        for start, end in data["missing_branches"]:
            key = (Path(name).name, lines[start - 1].strip())
            missing.setdefault(key, []).append((start, end))
    return missing, not_ok


def test_tables_take_every_branch_of_the_cpu_op_code(tmp_path):
    pytest.importorskip("coverage", reason="coverage.py is a dev extra: pip install -e '.[dev]'")
    missing, not_ok = _missing_branches(tmp_path)
    assert not not_ok, f"cases failing on the cpu backend: {not_ok[:5]}"
    unexplained = {key: arcs for key, arcs in missing.items() if key not in EXCLUDED}
    assert not unexplained, "branches no table takes (add cases, or an exclusion with its " \
        f"reason): {unexplained}"


def test_every_exclusion_names_a_line_of_the_op_code():
    sources = {Path(f).name: (ROOT / f).read_text() for f in OP_CODE}
    stale = [key for key in EXCLUDED if key[1] not in sources[key[0]]]
    assert not stale, f"exclusions whose line is gone: {stale}"
