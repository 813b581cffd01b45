"""Array views shared by the backends that keep their arrays in host memory."""

from __future__ import annotations

import numpy as np


def plain(arr: np.ndarray) -> np.ndarray:
    """The array without its subclass (e.g. a device-owned ndarray): kernels run on plain
    ndarrays, without the subclass's finalize overhead."""
    return arr.view(np.ndarray)
