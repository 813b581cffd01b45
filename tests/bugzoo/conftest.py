"""The bug zoo's broken backends live beside the tests as plain modules (op_bugs.py, ...)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
