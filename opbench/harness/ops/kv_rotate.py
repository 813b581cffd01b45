"""KV_ROTATE: in-place re-rotation of cached keys after eviction, from a float32 trig LUT."""

from __future__ import annotations

import functools

import numpy as np

from ...reference import kv_cache as kv_ref
from ..cases import LARGE_OFFSET, Axis, Case, Inputs, OpSpec, OutputSpec, itemsize, uniform

LUT_ROWS = 64  # deltas up to 63 blocks
BASE = 10000.0
# cache block counts past 32,767 and 65,535, where a 16-bit block index (signed or not) wraps;
# a tiny layout (2 tokens, 1 kv head, head dim 16) keeps 70,000 blocks at 9 MB in f32
BOUNDARY_BLOCKS = (40000, 70000)
WIDE_INDEX = 32768  # the first block index an int16 cannot hold
# --large: the same 32-value blocks in f16, one block past 2**31 elements (4 GiB)
LARGE_BLOCKS = LARGE_OFFSET // 32 + 1


def perf_case(dtype, bs, hs, nkvh, nrot, nblk) -> Case:
    return Case.make("KV_ROTATE", type=dtype, layout="rotate_half", delta="block", bs=bs, hs=hs,
                     nkvh=nkvh, nrot=nrot, nblk=nblk)


def _rotated_blocks(rng: np.random.Generator, n_blocks: int, n_rot: int) -> np.ndarray:
    """Distinct block indices; in a cache past the int16 range they all lie past it and
    include the last block, so a narrowed index reads and writes another block."""
    if n_blocks <= WIDE_INDEX:
        return rng.choice(n_blocks, size=n_rot, replace=False).astype(np.int32)
    wide = WIDE_INDEX + rng.choice(n_blocks - 1 - WIDE_INDEX, size=n_rot - 1, replace=False)
    return rng.permutation(np.append(wide, n_blocks - 1)).astype(np.int32)


class KvRotateSpec(OpSpec):
    name = "KV_ROTATE"
    method = "kv_rotate"
    axes = (
        Axis("type", ("f32", "f16", "bf16")),
        Axis("layout", ("rotate_half", "interleaved")),
        Axis("delta", ("block", "token")),
        Axis("bs", (8, 16, 32)),
        Axis("hs", (64, 80, 128)),
        Axis("nkvh", (1, 3, 4)),
        Axis("nrot", (1, 5)),
    )
    strength = 7  # every combination: each case is cheap

    def make_case(self, row) -> Case:
        return Case.make("KV_ROTATE", **row, nblk=row["nrot"] + 3)

    def extra_cases(self) -> list[Case]:
        """Boundary block counts: every rotated block index is past 32,767, the last block's
        past 65,535 as well when the cache has that many."""
        return [Case.make("KV_ROTATE", type=dtype, layout=layout, delta=delta, bs=2, hs=16,
                          nkvh=1, nrot=5, nblk=n_blocks)
                for n_blocks in BOUNDARY_BLOCKS
                for dtype, layout, delta in (("f32", "rotate_half", "block"),
                                             ("f16", "interleaved", "token"))]

    def large_cases(self) -> list[Case]:
        return [Case.make("KV_ROTATE", type="f16", layout="rotate_half", delta="token", bs=2,
                          hs=16, nkvh=1, nrot=5, nblk=LARGE_BLOCKS)]

    def make_inputs(self, case: Case, rng: np.random.Generator) -> Inputs:
        n_blocks, bs = case["nblk"], case["bs"]
        cache = uniform(rng, (n_blocks, bs, case["nkvh"], case["hs"]), case.dtype)
        blocks = _rotated_blocks(rng, n_blocks, case["nrot"])
        width = 1 if case["delta"] == "block" else bs
        deltas = rng.integers(1, LUT_ROWS, size=(case["nrot"], width)).astype(np.int32)
        lut = _lut(case["hs"], bs, case.get("base", BASE)).copy()  # a case's own array
        return Inputs({"key_cache": cache, "block_indices": blocks, "deltas": deltas,
                       "lut": lut})

    def outputs(self, case: Case, inputs: Inputs) -> dict[str, OutputSpec]:
        cache = inputs.arrays["key_cache"]
        return {"key_cache": OutputSpec(cache.shape, case.dtype, init_from="key_cache")}

    def call(self, backend, case, args, stream) -> None:
        backend.kv_rotate(args["key_cache"], args["block_indices"], args["deltas"], args["lut"],
                          case["layout"], stream=stream)

    def judged_rows(self, case: Case, inputs: Inputs) -> dict[str, np.ndarray]:
        """The rotated blocks; the rest of the cache must stay as it was, bit for bit."""
        return {"key_cache": np.sort(inputs.arrays["block_indices"])}

    def reference(self, case: Case, inputs: Inputs, dtype) -> dict[str, np.ndarray]:
        """The rotated blocks only (``judged_rows`` order), rotated in a copy of just them."""
        a = inputs.arrays
        rows = self.judged_rows(case, inputs)["key_cache"]
        local = np.searchsorted(rows, a["block_indices"]).astype(np.int32)
        out = kv_ref.rotate_keys(a["key_cache"][rows], local, a["deltas"], a["lut"],
                                 layout=case["layout"], dtype=dtype)
        return {"key_cache": out}

    def cost(self, case: Case) -> float:
        return float(case["nblk"] * case["bs"] * case["nkvh"] * case["hs"])

    def perf_cases(self, sizes: str) -> list[Case]:
        if sizes == "small":
            return [perf_case("f32", 16, 64, 2, 4, 8)]
        return [perf_case("f16", 16, 128, 8, 512, 2048), perf_case("f32", 16, 128, 8, 512, 2048)]

    def work(self, case, inputs, outputs) -> tuple[int, int]:
        rows = case["nrot"] * case["bs"] * case["nkvh"] * case["hs"]
        return 2 * rows * itemsize(case.dtype), 3 * rows  # only the rotated blocks, in place


@functools.lru_cache(maxsize=64)
def _lut(head_dim: int, block_size: int, base: float) -> np.ndarray:
    """The stored LUT of a geometry, computed once (64 rows of trig: 59 us, a fifth of a small
    case's inputs)."""
    return kv_ref.rotation_lut(LUT_ROWS, head_dim, block_size, base)
