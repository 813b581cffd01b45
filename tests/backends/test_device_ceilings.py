"""A GPU backend's own ceilings (``Backend.device_ceilings``): the arithmetic of the copy
ceiling, and which backends declare one (cupy measures its device; torch on the CPU does not)."""

from __future__ import annotations

import pytest

from opbench.backends.common import device_ceilings


def test_the_copy_ceiling_is_the_fastest_timed_copy_after_a_warm_up():
    times = iter([900.0, 5.0, 4.0, 2.0, 6.0, 3.0])  # the first (lazy setup) is not counted
    found = device_ceilings.gpu_ceilings(lambda: next(times), nbytes=1000, l2_bytes=50)
    assert found == {"copy_gbps": 2 * 1000 / 2.0, "llc_bytes": 50}  # read + written per ns
    assert next(times, None) is None  # one warm-up and COPY_REPEATS timed copies
    unknown_l2 = device_ceilings.gpu_ceilings(lambda: 10.0, nbytes=1000, l2_bytes=None)
    assert unknown_l2 == {"copy_gbps": 200.0}


def test_the_copy_outgrows_the_l2():
    assert device_ceilings.copy_bytes(None) == device_ceilings.MIN_COPY_BYTES
    assert device_ceilings.copy_bytes(50 << 20) == 200 << 20


def test_torch_on_the_cpu_leaves_the_host_ceilings_in_force():
    from opbench.backends.torch_backend import TorchBackend

    available, why = TorchBackend.available()
    if not available:
        pytest.skip(why)
    torch = pytest.importorskip("torch")
    backend = TorchBackend()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    backend.devices(1)
    assert backend.device_ceilings() is None
