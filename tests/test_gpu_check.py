"""benchmarks/gpu_check.sh --dry-run: the GPU check's every step, on the CPU stand-ins, so the
script is known to work before a GPU ever sees it (see docs/gpu.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ("doctor", "pytest-gpu", "test", "test-triton", "scenario", "perf", "figures", "launch",
         "report")


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("bash") is None,
                    reason="gpu_check.sh needs bash and coreutils' timeout")
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           str(out)], env=env, capture_output=True, text=True, timeout=1500)
    summary = (out / "summary.md").read_text()
    assert done.returncode == 0, summary + done.stderr[-2000:]
    for step in STEPS:
        assert f"| {step} | 0 |" in summary, summary
    assert "overall: passed" in summary and "- no failing record" in summary
    assert "Copy ceiling:" in summary  # the figures made it into the summary
    assert "| CPY | torch |" in summary
    # the host time per call, a line per backend and case, from the launch step's profiles
    assert "- cupy-emu: ROPE(type=f32," in summary and "- torch: CPY(type_src=f32," in summary
    assert "host time per enqueue:" in summary
    for name in ("test.jsonl", "scenario.jsonl", "perf.jsonl", "report/report.html"):
        assert (out / name).stat().st_size > 0, name


def test_gpu_check_usage_error():
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("usage:")
