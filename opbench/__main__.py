"""``python -m opbench``: the same as the ``opbench`` command (what torchrun -m launches)."""

import sys

from opbench.cli.main import main

sys.exit(main())
