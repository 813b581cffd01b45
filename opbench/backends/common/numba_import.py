"""``import_numba()``: numba, imported without SciPy's linear algebra.

At the first compile (or cache load) of any jitted function, numba imports ``numba.np.arraymath``,
which imports ``scipy.linalg`` only to learn whether a BLAS is there for ``np.dot``-style calls
inside jitted code (``_HAVE_BLAS``).  That import costs ~145 ms (SciPy's array-API layer clones
NumPy, which imports ``numpy.f2py``), in every process that runs a jitted kernel: each ``-j``
worker, each rank.  No jitted function of opbench calls a BLAS, so numba is set up with
``scipy.linalg`` hidden for that one import; a jitted ``np.dot`` (none today) would still find
the BLAS when it compiles (numba's ``ensure_blas`` imports SciPy then), only ``np.correlate``
and ``np.convolve`` would take numba's plain loop.
"""

from __future__ import annotations

import sys
import threading

_LOCK = threading.Lock()


def import_numba():
    """numba, its array-math registry loaded with ``scipy.linalg`` out of sight (unless
    something imported SciPy's linear algebra already, which then costs nothing more)."""
    with _LOCK:
        if "numba.np.arraymath" not in sys.modules and "scipy.linalg" not in sys.modules:
            _import_array_math_without_scipy_linalg()
        import numba

    return numba


def _import_array_math_without_scipy_linalg() -> None:
    sys.modules["scipy.linalg"] = None  # an import of it raises ImportError
    try:
        import numba.np.arraymath  # noqa: F401
    except ImportError:  # a numba that needs it after all: pay for it
        del sys.modules["scipy.linalg"]
        import numba.np.arraymath  # noqa: F401
    finally:
        if sys.modules.get("scipy.linalg", 0) is None:
            del sys.modules["scipy.linalg"]
