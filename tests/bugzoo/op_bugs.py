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

_original = {name: getattr(kernels, name) for name in ("attend", "_tile_scores", "set_rows")}


class PatchedKernels(CpuBackend):
    """Runs its queued work with some of the cpu kernels' helpers replaced."""

    patches: dict = {}

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


# -- ATTN ---------------------------------------------------------------------------------------
def _gqa_modulo_attend(q, k, v, p, q_pos, mask, sinks):
    """Query head h reads kv head h % Hkv instead of h // (H/Hkv)."""
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    group = n_heads // n_kv_heads
    heads = np.arange(n_heads)
    slot = (heads % n_kv_heads) * group + heads // n_kv_heads  # where head h must sit
    order = np.argsort(slot)
    out, lse = _original["attend"](q[:, order], k, v, p, q_pos, mask,
                                   None if sinks is None else sinks[order])
    return out[:, slot], lse[:, slot]


def _causal_off_by_one_attend(q, k, v, p, q_pos, mask, sinks):
    return _original["attend"](q, k, v, p, q_pos + 1, mask, sinks)


def _sinks_ignored_attend(q, k, v, p, q_pos, mask, sinks):
    return _original["attend"](q, k, v, p, q_pos, mask, None)


def _softcap_after_mask_scores(qg, k, keys, p, q_pos, mask, slopes, group):
    scores = _original["_tile_scores"](qg, k, keys, dataclasses.replace(p, softcap=0.0), q_pos,
                                       mask, slopes, group)
    if p.softcap > 0.0:
        scores[...] = p.softcap * np.tanh(scores / p.softcap)  # -inf becomes -softcap
    return scores


class GqaHeadModulo(PatchedKernels):
    patches = {"attend": _gqa_modulo_attend}


class CausalOffByOne(PatchedKernels):
    patches = {"attend": _causal_off_by_one_attend}


class SinksIgnored(PatchedKernels):
    patches = {"attend": _sinks_ignored_attend}


class SoftcapAfterMask(PatchedKernels):
    patches = {"_tile_scores": _softcap_after_mask_scores}


# -- KV_ROTATE ----------------------------------------------------------------------------------
class RotateSignFlipped(CpuBackend):
    """Rotates by +delta (the LUT's sin half negated back)."""

    def kv_rotate(self, key_cache, block_indices, deltas, lut, layout, stream=None):
        flipped = np.array(lut, copy=True)
        half = flipped.shape[1] // 2
        flipped[:, half:] *= -1
        super().kv_rotate(key_cache, block_indices, deltas, self.to_device(flipped, lut.device),
                          layout, stream)


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


#: bug class -> the op whose default table must catch it
OP_BUGS = {
    RopePairingSwapped: "ROPE",
    RopeTailRotated: "ROPE",
    RopeFreqFactorsMultiplied: "ROPE",
    GqaHeadModulo: "ATTN",
    CausalOffByOne: "ATTN",
    SoftcapAfterMask: "ATTN",
    SinksIgnored: "ATTN",
    RotateSignFlipped: "KV_ROTATE",
    PerTokenDeltasReadPerBlock: "KV_ROTATE",
    SetRowsWritesSkippedSlot: "SET_ROWS",
    F16Truncating: "CPY",
    WritesOneRowPastOutput: "GET_ROWS",
}
