"""The core never imports Ray: it is the optional extra opbench[ray]."""

from __future__ import annotations

import subprocess
import sys


def test_running_cases_does_not_import_ray():
    code = ("import sys; from opbench.cli.main import main; "
            "main(['test', '-o', 'CPY', '--quick', '-q', '-j', '2']); "
            "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
