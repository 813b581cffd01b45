"""Deliberately broken variants of the cpu backend, one real-world bug each.

Each class changes one thing: an argument on the way into a kernel, or one kernel helper
swapped for a broken copy while that backend's work runs.  The default case tables must catch
every one of them (test_op_zoo.py); a bug they cannot catch means a case is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from opbench.backends.cpu import CpuBackend, kernels

_original = {name: getattr(kernels, name) for name in (
    "attend", "_tile_scores", "set_rows", "get_rows", "_rope_cos_sin", "_attend_block",
    "_visible_key_range", "kv_rotate", "_gather_blocks", "paged_attention")}


class PatchedKernels(CpuBackend):
    """Runs its queued work with some of the cpu kernels' helpers replaced, with jit off: the
    patches replace NumPy helpers, which the numba loops (small attention calls) bypass."""

    patches: dict = {}

    def __init__(self, **options) -> None:
        options.setdefault("jit", False)
        super().__init__(**options)

    def _submit(self, device, stream, work):
        patches = self.patches

        def patched_work():
            with _patched(patches):
                work()

        super()._submit(device, stream, patched_work)


@contextlib.contextmanager
def _patched(patches):
    saved = {name: getattr(kernels, name) for name in patches}
    for name, fn in patches.items():
        setattr(kernels, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)


# -- ROPE ---------------------------------------------------------------------------------------
class RopePairingSwapped(CpuBackend):
    """normal (GPT-J) and neox (rotate_half) pairings exchanged."""

    def rope(self, x, pos, out, p, freq_factors=None, stream=None):
        swap = {"normal": "neox", "neox": "normal"}
        p = dataclasses.replace(p, mode=swap.get(p.mode, p.mode))
        super().rope(x, pos, out, p, freq_factors, stream)


class RopeTailRotated(CpuBackend):
    """Dims past n_dims rotated as well (n_dims taken as the head size)."""

    def rope(self, x, pos, out, p, freq_factors=None, stream=None):
        head_dim = x.shape[-1]
        if p.mode != "mrope" and freq_factors is None:
            p = dataclasses.replace(p, n_dims=head_dim)
        super().rope(x, pos, out, p, freq_factors, stream)


class RopeFreqFactorsMultiplied(CpuBackend):
    """freq_factors multiply theta instead of dividing it."""

    def rope(self, x, pos, out, p, freq_factors=None, stream=None):
        if freq_factors is not None:
            freq_factors = self.to_device(1.0 / np.asarray(freq_factors), freq_factors.device)
        super().rope(x, pos, out, p, freq_factors, stream)


def _mrope_cos_sin_without_wrap(pos, p, freq_factors, cache):
    """mrope sector = pair index (no ``mod sum(sections)``): pairs past the sections' sum read
    the fourth position stream instead of wrapping to the first."""
    if p.mode != "mrope":
        return _original["_rope_cos_sin"](pos, p, freq_factors, cache)
    positions = pos.astype(np.int64)
    n_pairs = p.n_dims // 2
    row_of_pair = np.searchsorted(np.cumsum(p.sections[:3]), np.arange(n_pairs), side="right")
    cos = np.empty((positions.shape[1], n_pairs), np.float32)
    sin = np.empty_like(cos)
    for row in np.unique(row_of_pair):
        cols = row_of_pair == row
        c, s = kernels._cos_sin_for(positions[row], p, freq_factors, cache)
        cos[:, cols], sin[:, cols] = c[:, cols], s[:, cols]
    return cos, sin


class MropeSectorNotWrapped(PatchedKernels):
    patches = {"_rope_cos_sin": _mrope_cos_sin_without_wrap}


# -- ATTN ---------------------------------------------------------------------------------------
def _gqa_modulo_attend(q, k, v, p, q_pos, mask, sinks, slopes=None):
    """Query head h reads kv head h % Hkv instead of h // (H/Hkv)."""
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    group = n_heads // n_kv_heads
    heads = np.arange(n_heads)
    slot = (heads % n_kv_heads) * group + heads // n_kv_heads  # where head h must sit
    order = np.argsort(slot)
    out, lse = _original["attend"](q[:, order], k, v, p, q_pos, mask,
                                   None if sinks is None else sinks[order],
                                   None if slopes is None else slopes[order])
    return out[:, slot], lse[:, slot]


def _causal_off_by_one_attend(q, k, v, p, q_pos, mask, sinks, slopes=None):
    return _original["attend"](q, k, v, p, q_pos + 1, mask, sinks, slopes)


def _sinks_ignored_attend(q, k, v, p, q_pos, mask, sinks, slopes=None):
    return _original["attend"](q, k, v, p, q_pos, mask, None, slopes)


def _softcap_after_mask_scores(qg, k, keys, p, q_pos, mask, slopes, group):
    scores = _original["_tile_scores"](qg, k, keys, dataclasses.replace(p, softcap=0.0), q_pos,
                                       mask, slopes, group)
    if p.softcap > 0.0:
        scores[...] = p.softcap * np.tanh(scores / p.softcap)  # -inf becomes -softcap
    return scores


class WindowOnlyWhenCausal(CpuBackend):
    """The sliding window is applied on the causal path only; non-causal attention sees every
    key."""

    def attention(self, q, k, v, out, params, **kwargs):
        if not params.causal and params.window:
            params = dataclasses.replace(params, window=0)
        super().attention(q, k, v, out, params, **kwargs)


class GqaHeadModulo(PatchedKernels):
    patches = {"attend": _gqa_modulo_attend}


class CausalOffByOne(PatchedKernels):
    patches = {"attend": _causal_off_by_one_attend}


class SinksIgnored(PatchedKernels):
    patches = {"attend": _sinks_ignored_attend}


class SoftcapAfterMask(PatchedKernels):
    patches = {"_tile_scores": _softcap_after_mask_scores}


class AttnScaleFromHeadSize(CpuBackend):
    """Softmax scale recomputed as head_size**-0.5 instead of the one passed: right for most
    models, wrong for DeepSeek-V2's YaRN (scale times mscale**2)."""

    def attention(self, q, k, v, out, params, **kwargs):
        params = dataclasses.replace(params, scale=q.shape[-1] ** -0.5)
        super().attention(q, k, v, out, params, **kwargs)


# -- KV_ROTATE ----------------------------------------------------------------------------------
class RotateSignFlipped(CpuBackend):
    """Rotates by +delta (the LUT's sin half negated back)."""

    def kv_rotate(self, key_cache, block_indices, deltas, lut, layout, stream=None):
        flipped = np.array(lut, copy=True)
        half = flipped.shape[1] // 2
        flipped[:, half:] *= -1
        super().kv_rotate(key_cache, block_indices, deltas, self.to_device(flipped, lut.device),
                          layout, stream)


def _kv_rotate_uint16_blocks(key_cache, block_indices, deltas, lut, layout):
    """Block indices kept in uint16 in the kernel: block 70,000 rotates block 4,464."""
    narrow = block_indices.astype(np.uint16).astype(np.int32)
    _original["kv_rotate"](key_cache, narrow, deltas, lut, layout)


class RotateUint16BlockIndices(PatchedKernels):
    patches = {"kv_rotate": _kv_rotate_uint16_blocks}


class PerTokenDeltasReadPerBlock(CpuBackend):
    """Reads only the first delta of each block from a per-token [R, B] table."""

    def kv_rotate(self, key_cache, block_indices, deltas, lut, layout, stream=None):
        first = self.to_device(np.ascontiguousarray(np.asarray(deltas)[:, :1]), deltas.device)
        super().kv_rotate(key_cache, block_indices, first, lut, layout, stream)


# -- copies -------------------------------------------------------------------------------------
def _set_rows_writing_minus_one(dst, src, slots):
    dst[slots] = kernels.convert(src, dst.dtype)  # slot -1 lands on the last row


class SetRowsWritesSkippedSlot(PatchedKernels):
    patches = {"set_rows": _set_rows_writing_minus_one}


def _set_rows_int16_slots(dst, src, slots):
    """Slot indices narrowed to int16 on the way into the kernel: slot 40,000 becomes -25,536
    (a row counted from the end of the table)."""
    narrow = slots.astype(np.int16).astype(np.int32)
    _original["set_rows"](dst, src, np.where(narrow < -1, narrow + len(dst), narrow))


class SetRowsInt16Slots(PatchedKernels):
    patches = {"set_rows": _set_rows_int16_slots}


def _get_rows_uint16_rows(src, rows, out):
    """Row indices kept in uint16: row 70,000 reads row 4,464."""
    _original["get_rows"](src, rows.astype(np.uint16).astype(np.int32), out)


class GetRowsUint16Rows(PatchedKernels):
    patches = {"get_rows": _get_rows_uint16_rows}


class F16Truncating(CpuBackend):
    """f32 -> f16 rounds toward zero instead of to nearest even."""

    def cpy(self, src, out, perm, step=1, stream=None):
        if not (src.dtype == np.float32 and out.dtype == np.float16):
            return super().cpy(src, out, perm, step, stream)
        self.synchronize()
        view = np.asarray(src).transpose(perm)[::step]
        rounded = view.astype(np.float16)
        too_far = np.abs(rounded.astype(np.float32)) > np.abs(view)
        toward_zero = np.nextafter(rounded, np.float16(0))
        out[...] = np.where(too_far, toward_zero, rounded)


class WritesOneRowPastOutput(CpuBackend):
    """get_rows writes one extra row after the end of its output."""

    def get_rows(self, src, rows, out, stream=None):
        super().get_rows(src, rows, out, stream)
        self.synchronize()
        past = np.lib.stride_tricks.as_strided(out, shape=(out.shape[0] + 1,) + out.shape[1:],
                                               strides=out.strides)
        past[-1] = past[-2]


# -- bugs only the special-value, size-threshold and position cases reach ----------------------
class SignallingNanFromConversion(PatchedKernels):
    """Conversions keep NumPy's NaN bits: bf16 0x7f81 -> f16 gives the signalling 0x7c08."""

    patches = {"quiet_nans": lambda converted: converted}


class F16OverflowSaturates(CpuBackend):
    """f32 -> f16 clamps to +-65504 instead of rounding to +-Inf past the largest value."""

    def cpy(self, src, out, perm, step=1, stream=None):
        if src.dtype == np.float32 and out.dtype == np.float16:
            clamped = np.clip(np.asarray(src), -65504.0, 65504.0)  # NaN stays NaN
            src = self.to_device(clamped.astype(np.float32), src.device)
        super().cpy(src, out, perm, step, stream)


def _query_blocks_restart_positions(q, k, v, p, q_pos, mask, sinks, slopes=None):
    """Every query block reuses the first block's positions (past one block of queries only)."""
    block = kernels.ATTN_Q_BLOCK
    if not (p.causal or p.window > 0) or len(q) <= block:
        return _original["attend"](q, k, v, p, q_pos, mask, sinks, slopes)
    if slopes is None:
        slopes = kernels.alibi_slopes(q.shape[1], p.max_bias)
    parts = [_original["_attend_block"](q[i:i + block], k, v, p, q_pos[: len(q[i:i + block])],
                                        None if mask is None else mask[i:i + block], sinks,
                                        slopes)
             for i in range(0, len(q), block)]
    return np.concatenate([o for o, _ in parts]), np.concatenate([lse for _, lse in parts])


class QueryBlocksRestartPositions(PatchedKernels):
    patches = {"attend": _query_blocks_restart_positions}


def _window_start_mirrored(p, q_pos, n_kv):
    """The window's first key as abs(q - window + 1): right once every query is past the
    window's length, wrong for a prefill from position 0 (keys 0..window-2 skipped)."""
    lo, hi = _original["_visible_key_range"](p, q_pos, n_kv)
    if p.window > 0 and len(q_pos):
        lo = abs(int(q_pos.min()) - p.window + 1)
    return lo, max(lo, hi)


def _gather_int16_blocks(cache, blocks, n_kv):
    """Block-table entries narrowed to int16: block 40,000 becomes -25,536, a block counted
    from the end of the cache."""
    narrow = blocks.astype(np.int16).astype(np.int32)
    return _original["_gather_blocks"](cache, np.where(narrow < 0, narrow + len(cache), narrow),
                                       n_kv)


class PagedInt16BlockTable(PatchedKernels):
    patches = {"_gather_blocks": _gather_int16_blocks}


class WindowStartMirrored(PatchedKernels):
    patches = {"_visible_key_range": _window_start_mirrored}


class RopeNegativePositionsClamped(CpuBackend):
    """Positions read as unsigned-style indices: negative K-shift deltas become 0."""

    def rope(self, x, pos, out, p, freq_factors=None, stream=None):
        clamped = np.maximum(np.asarray(pos), 0).astype(np.asarray(pos).dtype)
        super().rope(x, self.to_device(clamped, pos.device), out, p, freq_factors, stream)


def _rows_searched_from_the_left(q, k_cache, v_cache, out, p, block_table, seq_lens, q_start,
                                 sinks=None, lse=None, use_jit=True):
    """Each query row's sequence found as the q_start entry equal to the row, else the one
    before it (a left search): right while q_start rises strictly, but a sequence without
    queries repeats its entry and takes the first row of the sequence after it."""
    rows = np.arange(q.shape[0])
    left = np.searchsorted(q_start, rows, side="left")
    hit = q_start[np.minimum(left, len(q_start) - 1)] == rows
    seq_of_row = np.where(hit, left, left - 1)
    rebuilt = np.searchsorted(seq_of_row, np.arange(len(seq_lens) + 1), side="left")
    _original["paged_attention"](q, k_cache, v_cache, out, p, block_table, seq_lens,
                                 rebuilt.astype(q_start.dtype), sinks, lse, use_jit)


class PagedRowsToWrongSequence(PatchedKernels):
    patches = {"paged_attention": _rows_searched_from_the_left}


def _empty_slots_compacted(q, k_cache, v_cache, out, p, block_table, seq_lens, q_start,
                           sinks=None, lse=None, use_jit=True):
    """Empty slots (seq_len 0) dropped from the batch before the launch, but the block table
    left as it was: every sequence after an empty slot reads the block-table row before its
    own, whose unused entries (-1) index from the end of the cache as a negative offset does."""
    keep = np.asarray(seq_lens) > 0
    starts = np.append(np.asarray(q_start)[:-1][keep], q_start[-1]).astype(q_start.dtype)
    table = np.array(block_table[:int(keep.sum())])
    table[table < 0] += k_cache.shape[0]
    _original["paged_attention"](q, k_cache, v_cache, out, p, table.astype(block_table.dtype),
                                 seq_lens[keep], starts, sinks, lse, use_jit)


class PagedEmptySlotsCompacted(PatchedKernels):
    patches = {"paged_attention": _empty_slots_compacted}


#: bug -> (op, regex of the case ids of the new input kind that alone catches it)
NEW_INPUT_BUGS = {
    SignallingNanFromConversion: ("CPY", r"vals=special"),
    F16OverflowSaturates: ("CPY", r"vals=special"),
    QueryBlocksRestartPositions: ("ATTN", r"nq=(6[5-9]|[7-9]\d|[1-9]\d\d)\b"),
    WindowStartMirrored: ("ATTN", r"nq=(\d+),nkv=\1,.*win=1"),
    RopeNegativePositionsClamped: ("ROPE", r"pos=neg"),
    PagedRowsToWrongSequence: ("ATTN", r"idle=[12]"),
    PagedEmptySlotsCompacted: ("ATTN", r"idle=2"),
}

#: bug class -> the op whose default table must catch it
OP_BUGS = {
    RopePairingSwapped: "ROPE",
    RopeTailRotated: "ROPE",
    RopeFreqFactorsMultiplied: "ROPE",
    MropeSectorNotWrapped: "ROPE",
    WindowOnlyWhenCausal: "ATTN",
    GqaHeadModulo: "ATTN",
    CausalOffByOne: "ATTN",
    SoftcapAfterMask: "ATTN",
    SinksIgnored: "ATTN",
    RotateSignFlipped: "KV_ROTATE",
    PerTokenDeltasReadPerBlock: "KV_ROTATE",
    SetRowsWritesSkippedSlot: "SET_ROWS",
    SetRowsInt16Slots: "SET_ROWS",
    GetRowsUint16Rows: "GET_ROWS",
    RotateUint16BlockIndices: "KV_ROTATE",
    PagedInt16BlockTable: "ATTN",
    F16Truncating: "CPY",
    WritesOneRowPastOutput: "GET_ROWS",
    **{bug: op for bug, (op, _) in NEW_INPUT_BUGS.items()},
}

#: bug class -> (case-id pattern of the cases the bug can touch at all, pattern of the new
#: cases that alone catch it): every other touched case passes the bug
ONLY_NEW_CASES_CATCH = {
    SetRowsInt16Slots: (r"", r"nslots=(40000|70000)"),
    GetRowsUint16Rows: (r"", r"nsrc=70000"),
    RotateUint16BlockIndices: (r"", r"nblk=70000"),
    PagedInt16BlockTable: (r"paged=[1-9]", r"nblk=(40000|70000)"),
    MropeSectorNotWrapped: (r"mode=mrope", r"sec=short"),
    WindowOnlyWhenCausal: (r"win=1", r"causal=0,win=1"),
}

#: bug class -> (op, model preset): the default tables pass the bug, the model's cases catch it
MODEL_BUGS = {
    AttnScaleFromHeadSize: ("ATTN", "deepseek-v2-lite"),
}
