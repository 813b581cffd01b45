"""numba set up without SciPy's linear algebra (``backends/common/numba_import.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FRESH_PROCESS = """
import sys
import numpy as np
from opbench.harness import draws
from opbench.backends.cpu import jit

values = draws.uniform(7, 1000)  # numba's first cache load (or compile) of a draw loop
assert np.array_equal(values, draws.uniform_numpy(7, 1000)), "draw differs from NumPy's"
assert jit._compile() is not False, jit._load_error  # the cpu backend's kernels load too
print("linalg-after-numba", "scipy.linalg" in sys.modules)
import scipy.linalg  # still importable afterwards (the gate's statistics need SciPy)
print("norm", scipy.linalg.norm([3.0, 4.0]))
"""


def test_numba_loads_kernels_without_importing_scipy_linalg():
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr
    assert "linalg-after-numba False" in run.stdout
    assert "norm 5.0" in run.stdout
