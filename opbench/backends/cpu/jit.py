"""Optional numba kernels (numba_kernels.py) and the host side that splits them over the cores.

numba is optional: ``available()`` is False without it and the NumPy kernels are used (a numba
that is installed but cannot load them warns, see ``_compile``).  It is imported lazily (on the
first call that could use it), so importing the backend stays cheap.  float16 arrays are handed
to the kernels as their uint16 bit patterns.  Results never depend on the thread count: see
``parallel``.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings

import numpy as np

from ..common.numba_import import import_numba
from . import parallel

_lock = threading.Lock()
_kernels: object | None = None
_load_error: str | None = None  # why an installed numba did not load the kernels
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
#: storage dtypes the kernels read and write (bfloat16 takes the NumPy path)
KERNEL_DTYPES = (F16, F32)
PARALLEL_ELEMENTS = 1 << 16  # below this one call stays on its thread (a wake-up is ~20 us)


def available() -> bool:
    """numba imports and compiles the kernels (the first call pays the compile or a cache
    load; later ones nothing)."""
    return bool(_load())


def installed() -> bool:
    """Cheap: whether numba could be imported (for reports; does not import it)."""
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def handles(*arrays: np.ndarray) -> bool:
    """True when every array has a kernel dtype and numba is available."""
    return all(a.dtype in KERNEL_DTYPES for a in arrays) and available()


def bits(a: np.ndarray) -> np.ndarray:
    """What a kernel is handed: float16 as uint16 bit patterns, anything else unchanged."""
    return a.view(np.uint16) if a.dtype == F16 else a


# -- conversions and copies --------------------------------------------------------------------
def f32_to_f16(src, dst) -> None:
    """dst (float16, contiguous) = src (float32, same shape) rounded to nearest even."""
    convert(np.ascontiguousarray(src), dst)


def f16_to_f32(src) -> np.ndarray:
    """float16 array (any layout) -> new contiguous float32 array, exact."""
    out = np.empty(src.shape, F32)
    convert(np.ascontiguousarray(src), out)
    return out


def convert(src, dst) -> None:
    """dst[...] = src for contiguous arrays of one shape: exact, or rounded once to dst."""
    flat_src, flat_dst = bits(src).reshape(-1), bits(dst).reshape(-1)
    kernels = _load()
    if flat_src.size <= PARALLEL_ELEMENTS:  # one chunk: no thread count, counter or crew
        kernels.convert_flat(flat_src, flat_dst)
        return
    claimed = kernels.copy_streaming_claimed if streams(flat_src, flat_dst) \
        else kernels.convert_claimed
    _in_claimed_chunks(claimed, flat_src.size, 1, flat_src, flat_dst)


def streams(src: np.ndarray, dst: np.ndarray) -> bool:
    """A same-type copy writes past the cache when its destination fills half the last-level
    cache or more: one thread, [16384, 8, 128] f32 (64 MiB) 3.74 ms streamed against 5.17 with
    normal stores (torch's copy_ 5.35), 16 MiB cold 1.44 against 1.57 (docs/perf.md,
    "Thirteenth pass").  Smaller copies keep their output in the cache, for the op that reads
    it next.  (The streaming store needs an element-aligned destination: NumPy's always is.)"""
    return (src.dtype == dst.dtype and dst.nbytes >= streaming_bytes()
            and dst.ctypes.data % dst.itemsize == 0)


def copy_streaming(src, dst) -> None:
    """dst[:] = src[:] (1-D, one dtype) with streaming stores, on this thread alone (the
    calibration's copy ceiling splits it itself)."""
    _load().copy_flat_streaming(src, dst)


@functools.cache
def streaming_bytes() -> int:
    from ..common.host import cache_bytes

    return cache_bytes() // 2


#: the elements of a copy's claimed chunk at most: ~1 MiB, a few chunks per thread for the
#: large copies ([4096, 8, 128] f32 -> f16 on two threads: chunks of 64K elements 0.31 ms,
#: 256K 0.30 ms, 512K and 1M 0.32 ms; equal halves 0.35 ms)
COPY_CHUNK_ELEMENTS = 1 << 18


def _in_claimed_chunks(claimed_kernel, n_items: int, elements_per_item: int, *args) -> None:
    """claimed_kernel(*args, counter, chunk, posted) over ``n_items`` items of
    ``elements_per_item`` elements, split over the cores in claimed chunks
    (``parallel.run_claimed``): about four chunks a thread, none under PARALLEL_ELEMENTS
    elements (where a split stops paying) nor over COPY_CHUNK_ELEMENTS.  A thread that comes
    late, or shares its core, finds fewer chunks instead of holding the others up: the copies,
    RoPE, KV_ROTATE and SET_ROWS run so (RoPE's four perf cases, against one part a thread:
    0.75-0.96 of the time, docs/perf.md "Twelfth pass").  (The callers run a call of one
    chunk's size or less directly: the same kernel loop, without the thread count, the counter
    and the crew's entry.)"""
    per_item, threads = max(1, elements_per_item), parallel.thread_count()
    quarter = n_items // (4 * threads)
    chunk = max(1, min(max(quarter, PARALLEL_ELEMENTS // per_item),
                       COPY_CHUNK_ELEMENTS // per_item))
    parallel.run_claimed(lambda counter, posted: claimed_kernel(*args, counter, chunk, posted),
                         -(-n_items // chunk), threads, n_items * per_item)


def wait_for_change(cell: np.ndarray, seen: int, rounds: int) -> bool:
    """True as soon as cell[0] (int64) != seen, False after ``rounds`` looks, without the GIL
    (``parallel``'s part threads watch for work with it)."""
    return _load().wait_for_change(cell, seen, rounds)


def wait_for_count(cell: np.ndarray, index: int, count: int, rounds: int) -> bool:
    """True as soon as cell[index] (int64) >= count, False after ``rounds`` looks, without
    the GIL (a claimed split's caller watches its chunks finish with it)."""
    return _load().wait_for_count(cell, index, count, rounds)


def gather_rows(src, rows, out) -> None:
    """out[r] = src[rows[r]], converted; rows already checked to be in range."""
    src2, out2 = bits(src).reshape(len(src), -1), bits(out).reshape(len(out), -1)
    kernels = _load()
    if out2.size <= PARALLEL_ELEMENTS:
        kernels.gather_rows(src2, rows, out2)
        return
    _in_claimed_chunks(kernels.gather_rows_claimed, len(out2), out2.shape[1], src2, rows, out2)


def copy_permuted_rows(src, out, perm, step: int) -> None:
    """out = src.transpose(perm)[::step], converted, for C-contiguous arrays whose last axis
    stays last.  The source is read row by row in its own order; parts are source rows, each
    written to its one row of out, so the bits do not depend on the split."""
    lead, out_lead = src.shape[:-1], out.shape[:-1]
    strides = np.empty(len(lead), np.int64)  # out rows per step along each source axis
    for k, axis in enumerate(perm[:-1]):
        strides[axis] = int(np.prod(out_lead[k + 1:], dtype=np.int64))
    src2, out2 = bits(src).reshape(-1, src.shape[-1]), bits(out).reshape(-1, out.shape[-1])
    rows = (src2, out2, np.array(lead, np.int64), strides, int(perm[0]), int(step))
    if src2.size <= PARALLEL_ELEMENTS:
        _load().copy_rows_permuted(*rows, 0, len(src2))
        return
    _in_claimed_chunks(_load().copy_rows_permuted_claimed, len(src2), src.shape[-1], *rows)


def scatter_rows(dst, src, slots) -> None:
    """dst[slots[r]] = src[r] for slots >= 0 (distinct, already checked), converted."""
    dst2, src2 = bits(dst).reshape(len(dst), -1), bits(src).reshape(len(src), -1)
    if src2.size <= PARALLEL_ELEMENTS:
        _load().scatter_rows(dst2, src2, slots)
        return
    _in_claimed_chunks(_load().scatter_rows_claimed, len(src2), src2.shape[1], dst2, src2, slots)


# -- ROPE, KV_ROTATE ------------------------------------------------------------------------------
def rope(x, cos, sin, rows, out, adjacent: bool) -> None:
    """Rotate x [tokens, heads, n_dims] into out (must not alias x); cos/sin float32
    [table rows, n_dims/2], token t's in row rows[t]; pairs (2i, 2i+1) when ``adjacent`` else
    (i, i + n_dims/2)."""
    kernels, x_bits, out_bits = _load(), bits(x), bits(out)
    if x.size <= PARALLEL_ELEMENTS:  # one chunk: no thread count, counter or crew
        kernel = kernels.rope_adjacent if adjacent else kernels.rope_halves
        kernel(x_bits, rows, out_bits, cos, sin)
        return
    _in_claimed_chunks(kernels.rope_claimed, len(x), x[0].size, x_bits, rows, out_bits, cos,
                       sin, adjacent)


def kv_rotate(cache, blocks, deltas, lut, interleaved: bool) -> None:
    """In place, blocks distinct (each part writes its own blocks)."""
    kernels, cache_bits = _load(), bits(cache)
    if len(blocks) * cache[0].size <= PARALLEL_ELEMENTS:
        kernels.kv_rotate(cache_bits, blocks, deltas, lut, interleaved)
        return
    _in_claimed_chunks(kernels.kv_rotate_claimed, len(blocks), cache[0].size, cache_bits,
                       blocks, deltas, lut, interleaved)


# -- ATTN --------------------------------------------------------------------------------------
def attend(q, k, v, table, q_pos, key_range, n_kv: int, scal, extras, out, lse,
           q_block: int, key_chunk: int) -> None:
    """See ``numba_kernels.attend``: one call on this thread, or, once a unit's
    multiply-adds outweigh a thread's wake-up, its (query block, key chunk) units split over
    the cores and ``combine`` after (the bits depend on neither).  ``n_kv``: the keys of the
    sequence (the last query sees them all), which fix the chunks."""
    kernels, (key_lo, key_hi), (mask, slopes, sinks) = _load(), key_range, extras
    k, v = bits(k), bits(v)
    n_blocks, n_chunks = -(-len(q) // q_block), max(1, -(-n_kv // key_chunk))
    work_per_unit = q.size * min(key_chunk, n_kv) // n_blocks
    min_units = -(-16 * PARALLEL_ELEMENTS // max(1, work_per_unit))  # multiply-adds ~ copies
    if n_blocks * n_chunks < 2 * min_units:
        kernels.attend(q, k, v, table, q_pos, key_lo, key_hi, scal, mask, slopes, sinks, out,
                       lse, q_block, key_chunk, n_chunks)
        return
    units = n_blocks * n_chunks
    rows = q.shape[1] * q_block
    part_m, part_l = np.empty((units, rows), F32), np.empty((units, rows), F32)
    part_acc = np.empty((units, rows, out.shape[2]), F32)

    def part(lo: int, hi: int) -> None:
        kernels.attend_units(q, k, v, table, q_pos, key_lo, key_hi, scal, mask, slopes, sinks,
                             part_m, part_l, part_acc, q_block, key_chunk, lo, hi)

    parallel.run_split(part, units, min_per_part=min_units)
    kernels.combine(part_m, part_l, part_acc, q_block, out, lse)


# -- loading -------------------------------------------------------------------------------------
def _load():
    global _kernels
    if _kernels is None:  # the lock only until the first load: every kernel call asks
        with _lock:
            if _kernels is None:
                _kernels = _compile()
    return _kernels


def load_error() -> str | None:
    """Why numba is installed and the kernels still did not load; None when they did, when
    none was tried yet, or without numba (cheap: never loads anything)."""
    return _load_error


def _compile():
    global _load_error
    if not installed():
        return False
    try:
        import_numba()
        from . import numba_kernels

        _warm_up(numba_kernels)
    except Exception as error:  # noqa: BLE001 - a numba that cannot load them: the NumPy path
        # said aloud: the NumPy path is several times slower, and nothing else would tell.  (Seen:
        # numba's on-disk cache written by these files loaded under another module name, which
        # benchmarks/perf_compare.py's --base did before it loaded a copy.)
        _load_error = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"the cpu backend's numba kernels did not load ({_load_error}); its NumPy path runs"
            f" instead, several times slower.  If numba's cache is stale, deleting the .nbi"
            f" and .nbc files in {_cache_folder()} makes numba compile them again",
            RuntimeWarning, stacklevel=4)
        return False
    return numba_kernels


def _cache_folder() -> str:
    """Where numba keeps these kernels' cache: NUMBA_CACHE_DIR, else beside the source."""
    return os.environ.get("NUMBA_CACHE_DIR") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "__pycache__")


def _warm_up(k) -> None:
    """One tiny call: a numba (or CPU) that cannot build the float16 conversion fails here,
    not in the middle of an op.  Other specializations compile on first use (numba caches
    them on disk, so a later process only loads them)."""
    k.convert_flat(np.ones(2, F32), np.empty(2, np.uint16))
    k.wait_for_change(np.zeros(1, np.int64), 0, 1)
    k.wait_for_count(np.zeros(2, np.int64), 1, 0, 1)
