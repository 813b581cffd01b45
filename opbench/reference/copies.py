"""Copy oracles: dtype rounding, SET_ROWS / GET_ROWS scatter-gather and CPY (ggml semantics).

Rounding is IEEE round-to-nearest-even, as ggml's and CUDA's f32 -> f16 / bf16 conversions.
f16 uses NumPy's casts, which round directly from any float width.  bf16 uses ml_dtypes; its
float64 -> bfloat16 cast goes through float32 and can round twice (1 + 2^-8 + 2^-30 becomes 1,
not 1 + 2^-7), so float64 inputs are first rounded to float32 *to odd*, which makes the second
rounding exact (float32 keeps 16 more bits than bfloat16).

NaNs follow the NaN rule (``nan_rule``): moves and widenings keep their bits, the other
conversions quiet them.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .nan_rule import keeps_nan_bits, quieted

DTYPE_NAMES = ("f32", "f16", "bf16")
_NUMPY_DTYPES = {
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
}


def _dtype_name(dtype) -> str:
    """Accept a storage name ("f32" | "f16" | "bf16") or the matching NumPy dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype name {dtype!r} must be one of {DTYPE_NAMES}")
        return dtype
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        np_dtype = None
    for name, candidate in _NUMPY_DTYPES.items():
        if np_dtype == candidate:
            return name
    raise ValueError(f"dtype {dtype!r} must be one of {DTYPE_NAMES} or their NumPy dtypes")


def float64_to_float32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 truncated toward zero, with the last bit set when inexact ("to odd")."""
    y = x.astype(np.float32)
    with np.errstate(invalid="ignore"):
        away = np.abs(y.astype(np.float64)) > np.abs(x)  # nearest rounding went away from zero
    y = np.where(away, np.nextafter(y, np.float32(0)), y)
    inexact = y.astype(np.float64) != x
    inexact &= ~np.isnan(x)
    bits = y.view(np.uint32) | inexact.astype(np.uint32)
    return bits.view(np.float32)


def round_to(x, dtype_name) -> np.ndarray:
    """x rounded to the storage dtype (f32 | f16 | bf16), round-to-nearest-even, as a new array."""
    name = _dtype_name(dtype_name)
    x = np.asarray(x)
    if x.dtype.kind != "f" and x.dtype != _NUMPY_DTYPES["bf16"]:
        raise ValueError(f"x must be a float array, got dtype {x.dtype}")
    target = _NUMPY_DTYPES[name]
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to +-inf rounds correctly
        if keeps_nan_bits(x.dtype, target):
            return x.astype(target)  # exact: a move or a widening keeps NaN bits as they are
        if name == "bf16" and x.dtype == np.float64:
            x = float64_to_float32_round_to_odd(x)
        return quieted(x.astype(target))  # NumPy's casts keep signalling NaNs signalling


def set_rows(dst, src, slots) -> np.ndarray:
    """ggml SET_ROWS: ``out = dst.copy(); out[slots[i]] = round_to(src[i], dst.dtype)``.

    dst ``[n_slots, ...]``, src ``[n_rows, ...]`` with the same trailing shape; slots int
    ``[n_rows]`` in [-1, n_slots), distinct apart from -1; slot -1 skips the row (vLLM's padding
    slot), leaving dst bit-identical there.
    """
    dst, src = np.asarray(dst), np.asarray(src)
    name = _dtype_name(dst.dtype)
    if src.ndim < 1 or dst.shape[1:] != src.shape[1:]:
        raise ValueError(f"src rows {src.shape[1:]} must match dst rows {dst.shape[1:]}")
    slots = _check_indices(slots, len(src), low=-1, high=len(dst), name="slots")
    used = slots[slots >= 0]
    if len(np.unique(used)) != len(used):
        # two rows racing for one slot have no defined result in a parallel kernel
        raise ValueError(f"slots={slots.tolist()} must be distinct (apart from -1)")
    out = dst.copy()
    out[used] = round_to(src[slots >= 0], name)
    return out


def get_rows(src, rows, out_dtype) -> np.ndarray:
    """ggml GET_ROWS: ``out[i] = round_to(src[rows[i]], out_dtype)``; rows int in [0, n_src)."""
    src = np.asarray(src)
    if src.ndim < 1:
        raise ValueError(f"src must have at least one dim, got shape {src.shape}")
    rows = np.asarray(rows)
    rows = _check_indices(rows, rows.shape[0] if rows.ndim == 1 else -1, low=0, high=len(src),
                          name="rows")
    return round_to(src[rows], out_dtype)


def _check_indices(idx, length: int, *, low: int, high: int, name: str) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.ndim != 1 or idx.dtype.kind not in "iu" or len(idx) != length:
        raise ValueError(f"{name} must be a 1-D int array of length {length}, "
                         f"got {idx.dtype} {idx.shape}")
    if ((idx < low) | (idx >= high)).any():
        raise ValueError(f"{name}={idx.tolist()} must lie in [{low}, {high})")
    return idx.astype(np.int64)


def cpy(src, out_dtype, perm=None, step=1) -> np.ndarray:
    """ggml CPY: ``round_to(src.transpose(perm)[::step], out_dtype)``, C-contiguous.

    perm None is the identity; step (>= 1) slices the first dim of the permuted view.
    """
    src = np.asarray(src)
    perm = tuple(range(src.ndim)) if perm is None else tuple(perm)
    if sorted(perm) != list(range(src.ndim)):
        raise ValueError(f"perm={perm} must be a permutation of range({src.ndim})")
    if not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step={step!r} must be an int >= 1")
    view = src.transpose(perm)[::step] if src.ndim else src
    return np.ascontiguousarray(round_to(view, out_dtype))
