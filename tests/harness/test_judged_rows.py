"""Outputs judged on the rows an op writes (``OpSpec.judged_rows``): KV_ROTATE's oracle holds
only the rotated blocks, and every other block of the cache must keep its bits."""

from __future__ import annotations

import numpy as np
import pytest

from opbench.backends.common.arrays import plain
from opbench.backends.cpu import CpuBackend
from opbench.harness.cases import Case
from opbench.harness.ops import SPECS
from opbench.harness.runner import run_case
from opbench.reference import kv_cache as kv_ref

SPEC = SPECS["KV_ROTATE"]
CASE = Case.make("KV_ROTATE", type="f16", layout="interleaved", delta="token", bs=8, hs=64,
                 nkvh=3, nrot=5, nblk=40)


def test_the_oracle_holds_the_rotated_blocks_of_the_whole_cache_rotation():
    inputs = SPEC.make_inputs(CASE, np.random.default_rng(0))
    a = inputs.arrays
    rows = SPEC.judged_rows(CASE, inputs)["key_cache"]
    assert list(rows) == sorted(set(a["block_indices"].tolist()))
    whole = kv_ref.rotate_keys(a["key_cache"], a["block_indices"], a["deltas"], a["lut"],
                               layout="interleaved")
    np.testing.assert_array_equal(SPEC.reference(CASE, inputs, np.float64)["key_cache"],
                                  whole[rows])


class SpillsIntoTheNextBlock(CpuBackend):
    """A token loop that runs to block_size inclusive: after each rotated block the first token
    of the next block is turned too (by pi here), a block the op was not asked to touch."""

    def kv_rotate(self, key_cache, block_indices, deltas, lut, layout, stream=None):
        super().kv_rotate(key_cache, block_indices, deltas, lut, layout, stream)
        cache, blocks = plain(key_cache), plain(block_indices)
        device = self._same_device("kv_rotate", key_cache=key_cache)

        def spill():
            for block in sorted(set(blocks.tolist())):
                if block + 1 < len(cache) and block + 1 not in blocks:
                    cache[block + 1, 0] = -cache[block + 1, 0]

        self._submit(device, stream, spill)


@pytest.mark.parametrize("backend_class, status", [(CpuBackend, "OK"),
                                                   (SpillsIntoTheNextBlock, "FAIL")])
def test_a_write_outside_the_rotated_blocks_fails_naming_the_row(backend_class, status):
    backend = backend_class()
    try:
        record = run_case(backend, CASE)
    finally:
        backend.close()
    assert record["status"] == status, record
    if status == "FAIL":
        assert "rows outside the 5 the op writes changed" in record["reason"]
