"""``perf --timeout``: a case that runs past its limit stops the run with one line naming it.

A perf run times each case in this process (a child process would time its own start-up and
caches, not the case), so a hang cannot become a TIMEOUT record and the run go on, as ``test
--isolate`` does.  What it can do is what a CI job needs: stop at once, say which case on
which backend hung, print every thread's stack (where it hung), and keep the records written
so far (each is flushed as it is written).  A timer thread does that; if the hang holds the GIL
so that no Python thread runs, Python's fault handler, armed a few seconds later, dumps the
stacks and exits from its own C thread.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
from collections.abc import Iterator

#: the exit status of a run stopped by --timeout (as coreutils' ``timeout`` exits)
TIMED_OUT = 124
#: seconds after the limit before the fault handler's own stop, for a hang holding the GIL
GIL_GRACE_S = 5.0


class CaseWatchdog:
    """``with watchdog.case(backend, case_id): ...`` stops the process when the block runs
    past ``seconds`` (None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    @contextlib.contextmanager
    def case(self, backend: str, case_id: str) -> Iterator[None]:
        if self.seconds is None:
            yield
            return
        timer = threading.Timer(self.seconds, self._expire, (backend, case_id))
        timer.daemon = True
        armed = _arm_fault_handler(self.seconds + GIL_GRACE_S)
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            if armed:
                faulthandler.cancel_dump_traceback_later()

    def _expire(self, backend: str, case_id: str) -> None:
        print(f"opbench: perf: {case_id} on {backend} ran past --timeout {self.seconds:g} s;"
              " stopping (records written so far are kept). Where every thread was:",
              file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):  # stderr without a file descriptor
            faulthandler.dump_traceback(all_threads=True)
        os._exit(TIMED_OUT)


def _arm_fault_handler(seconds: float) -> bool:
    try:
        faulthandler.dump_traceback_later(seconds, exit=True)
    except (AttributeError, ValueError, OSError):  # stderr without a file descriptor
        return False
    return True
