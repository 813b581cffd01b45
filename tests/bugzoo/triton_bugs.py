"""Deliberately broken variants of the Triton backend, one real-world kernel bug each.

Each class overrides one kernel launch of ``TritonBackend``.  Two launch a *mutant* of the real
kernel: the kernel's own source with one line changed (``mutant``), so the bug stays in step
with the kernel it breaks and a kernel edit that removes the line fails loudly here.  They run
in Triton's interpreter in CI, where the oracles must catch every one (test_triton_bugzoo.py).
"""

from __future__ import annotations

import inspect
import linecache
import textwrap

from opbench.backends.triton import TritonBackend


def mutant(kernel, old: str, new: str):
    """A copy of a ``@triton.jit`` kernel whose source has ``old`` replaced by ``new`` (once).

    The copy is compiled in the kernel module's globals, so it calls the same helpers.  Its
    source is registered with linecache: Triton reads a kernel's source to compile (or
    interpret) it."""
    fn = kernel.fn
    source = textwrap.dedent(inspect.getsource(fn))
    if source.count(old) != 1:
        raise AssertionError(f"{fn.__name__}: {old!r} must occur exactly once in the kernel")
    source = source.replace(old, new)
    filename = f"<opbench-bugzoo {fn.__name__}: {new.strip()}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = dict(fn.__globals__)
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own kernel source
    return namespace[fn.__name__]


class _MutantBackend(TritonBackend):
    """Caches one mutant kernel per class (made after the mode is set: Triton decides
    interpreter vs GPU when the kernel is decorated)."""

    _mutants: dict = {}

    def mutant(self, module, kernel_name: str, old: str, new: str):
        key = (type(self), kernel_name)
        if key not in self._mutants:
            self._mutants[key] = mutant(getattr(module, kernel_name), old, new)
        return self._mutants[key]


class TritonAttnTailUnmasked(_MutantBackend):
    """Missing mask on the last partial K/V tile: padded key slots past kv_len stay visible
    (score 0, value 0), inflating the softmax denominator.  Causal cases hide it (padded keys
    lie in the future); non-causal cases whose n_kv is not a multiple of the tile catch it."""

    def launch_attention(self, q, k, v, out, p, mask, sinks, lse, paged) -> None:
        kernel = self.mutant(
            self.k_attention, "flash_attention_kernel",
            "s = _biased_scores(s, mask_vals, q_pos[:, None], keys[None, :], key_ok[None, :],",
            "s = _biased_scores(s, mask_vals, q_pos[:, None], keys[None, :], keys[None, :] >= 0,",
        )
        tiles = self._attention_tiles(q.shape[-1], decode=False)
        self.k_attention.launch_attention(q, k, v, out, p, mask, sinks, lse, paged, **tiles,
                                          kernel=kernel)


class TritonBlockTableStride(TritonBackend):
    """Wrong stride for the paged block table: the host wrapper hands the kernel a table view
    with row stride 0 (as if the table were one row), so every sequence reads sequence 0's
    blocks.  Single-sequence cases cannot see it; multi-sequence paged cases do."""

    def launch_attention(self, q, k, v, out, p, mask, sinks, lse, paged) -> None:
        if paged is not None:
            table = paged.block_table
            flat_rows = table.as_strided(table.shape, (0, table.stride(1)))
            paged = type(paged)(flat_rows, paged.seq_lens, paged.q_start)
        super().launch_attention(q, k, v, out, p, mask, sinks, lse, paged)


class TritonSoftmaxForgetsMax(_MutantBackend):
    """Online-softmax rescale that forgets the running max: m_new is the tile's max only.  The
    rescale stays self-consistent while every tile has a visible key; a tile fully masked for
    some row (sliding window, causal tails) resets m to -inf and the next tile wipes the
    accumulator, or the row's lse comes out -inf.  Window and lse cases catch it."""

    def launch_attention(self, q, k, v, out, p, mask, sinks, lse, paged) -> None:
        kernel = self.mutant(self.k_attention, "flash_attention_kernel",
                             "m_new = tl.maximum(m_i, tl.max(s, 1))", "m_new = tl.max(s, 1)")
        tiles = self._attention_tiles(q.shape[-1], decode=False)
        self.k_attention.launch_attention(q, k, v, out, p, mask, sinks, lse, paged, **tiles,
                                          kernel=kernel)


class TritonSplitSinksPerSplit(_MutantBackend):
    """Split-KV decode merge that counts the attention sink once per split instead of once: the
    denominator gains (n_splits - 1) extra exp(sink).  Decode cases with sinks and a KV range
    longer than one split catch it."""

    def launch_decode(self, q, k, v, out, p, mask, sinks, lse, paged) -> None:
        merge = self.mutant(self.k_attention, "merge_partials_kernel",
                            "denom += tl.exp(sink - total_max)",
                            "denom += n_splits * tl.exp(sink - total_max)")
        tiles = self._attention_tiles(q.shape[-1], decode=True)
        self.k_attention.launch_decode(q, k, v, out, p, mask, sinks, lse, paged, **tiles,
                                       merge_kernel=merge)


class TritonBf16Truncates(_MutantBackend):
    """float32 -> bfloat16 by truncation (dropping the low 16 bits) instead of round to nearest
    even: the classic hand-written bf16 store.  Exact ops (CPY, GET_ROWS) with bf16 output catch
    it at once."""

    def launch_cpy(self, src, out, perm, step) -> None:
        from opbench.backends.triton import kernels_common

        store = self.mutant(kernels_common, "store_f32",
                            "rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16",
                            "rounded = bits >> 16")
        copy = self.mutant(kernels_common, "copy_elements", "store_f32(", "store_truncating(")
        copy.fn.__globals__["store_truncating"] = store
        cpy = self.mutant(self.k_copy, "cpy_kernel", "copy_elements(", "copy_truncating(")
        cpy.fn.__globals__["copy_truncating"] = copy
        self.k_copy.launch_cpy(src, out, perm, step, kernel=cpy)


#: bug class -> the op whose cases must catch it
TRITON_BUGS = {
    TritonAttnTailUnmasked: "ATTN",
    TritonBlockTableStride: "ATTN",
    TritonSoftmaxForgetsMax: "ATTN",
    TritonSplitSinksPerSplit: "ATTN",
    TritonBf16Truncates: "CPY",
}
