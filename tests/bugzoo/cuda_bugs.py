"""Deliberately broken variants of the cupy backend's CUDA kernels, one real-world bug each.

Each class is the CPU-emulated cupy backend compiling a *mutant* of one kernels/*.cu file: the
real source with one line changed, so the bug stays in step with the kernel it breaks (a kernel
edit that removes the line fails loudly here).  The emulator runs them in CI, where the oracles
must catch every one (tests/backends/test_cupy_emulator_bugzoo.py).
"""

from __future__ import annotations

from opbench.backends.cupy import plan
from opbench.backends.cupy.emulator import CupyEmulatorBackend


class _CudaMutant(CupyEmulatorBackend):
    #: (file, line as written in the kernel, its broken replacement)
    MUTATION: tuple[str, str, str]

    def _source(self, file_name: str) -> str:
        source = plan.load_source(file_name)
        mutated_file, old, new = self.MUTATION
        if file_name != mutated_file:
            return source
        if source.count(old) != 1:
            raise AssertionError(f"{mutated_file}: {old!r} must occur exactly once")
        return source.replace(old, new)


class CudaAttnTailUnmasked(_CudaMutant):
    """The score loop forgets ``t < k_hi``: the zero-filled key slots of the last partial tile
    score 0 and join the softmax.  Non-causal cases whose key range is not a tile multiple."""

    MUTATION = ("attention.cu", "if (row_valid && t < k_hi) {", "if (row_valid) {")


class CudaAttnGroupSharesOneHead(_CudaMutant):
    """A decode block that takes several query heads of one KV head gives every block row the
    group's first head: its slope and sink and where its output goes.  GQA decode."""

    MUTATION = ("attention.cu", "const int hl = r / qpb, h = h0 + hl;",
                "const int hl = r / qpb, h = h0;")


class CudaAttnKeyGroupsUnscaled(_CudaMutant):
    """The key groups of a decode head merge their accumulators without rescaling each to the
    common maximum: right only where every group saw the same largest score.  Decode."""

    MUTATION = ("attention.cu",
                "o += Gacc[(r + k) * Dv + d] * expf(Gm[r + k] - base);",
                "o += Gacc[(r + k) * Dv + d];")


class CudaAttnRescaleForgotten(_CudaMutant):
    """The online softmax raises its running max but leaves the accumulator unscaled: right
    for one tile, wrong as soon as a later tile holds a larger score."""

    MUTATION = ("attention.cu", "float o = acc[a] * alpha;", "float o = acc[a];")


class CudaAttnMissingBarrier(_CudaMutant):
    """No barrier before staging the next K/V tile: fast threads overwrite the tile slower
    ones still read.  On a GPU it is timing-dependent; the emulator's fibers make it certain."""

    MUTATION = ("attention.cu",
                "__syncthreads();  // previous tile fully consumed (and Q staged, on the first "
                "pass)", "")


class CudaKvRotatePerBlockDelta(_CudaMutant):
    """Per-token deltas read as per-block ones: every token of a block moves by its first
    token's delta.  Only the cases with per-token deltas can see it."""

    MUTATION = ("kv_rotate.cu", "deltas[per_token ? (long long)r * block_size + t : r]",
                "deltas[r]")


#: bug class -> the op whose quick cases must catch it
CUDA_BUGS = {
    CudaAttnTailUnmasked: "ATTN",
    CudaAttnRescaleForgotten: "ATTN",
    CudaAttnMissingBarrier: "ATTN",
    CudaAttnGroupSharesOneHead: "ATTN",
    CudaAttnKeyGroupsUnscaled: "ATTN",
    CudaKvRotatePerBlockDelta: "KV_ROTATE",
}
