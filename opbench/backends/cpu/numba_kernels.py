"""The cpu backend's numba kernels.  Imported only by ``jit._compile`` (it imports numba).

``jit`` hands each kernel one part of its outermost independent axis (a slice of tokens,
rows or blocks; ``attend`` takes a range of units), so ``parallel.run_split`` can spread one
call over the cores; each output element is computed by one part with the same operations in
the same order, whatever the split.  (Loops run over ``range(len)``, not ``range(lo, hi)``:
numba cannot prove ``lo`` non-negative, and the index checks that follow stop LLVM from
vectorizing the loop, 10x slower on the conversions.)  float16 arrays
arrive as their uint16 bit patterns (numba has no CPU float16 type); ``to_f32`` / ``from_f32``
pick the conversion from the element type when the kernel is compiled, so one kernel body
serves float32 and float16 storage.  No fastmath, but for attention's dot products: the loops
keep the float32 operations of the NumPy kernels (in kernels.py), which the precision rule
judges; attention's NumPy path sums its dot products in BLAS's order, so neither path has a
summation order to keep.
"""

from __future__ import annotations

import math
import platform

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

F32 = np.float32
KEY_TILE = 32  # keys per online-softmax step: the scores [rows, 32] stay in L1


# -- float16 <-> float32, on bit patterns ------------------------------------------------------
@intrinsic
def _fptrunc_half_bits(typingctx, x):
    """IEEE round-to-nearest-even float32 -> binary16 bits (one F16C instruction on x86)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _fpext_half_bits(typingctx, h):
    """binary16 bits -> float32 bits, exact (hardware quiets a signalling NaN)."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        value = builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return builder.bitcast(value, ir.IntType(32))

    return types.uint32(types.uint16), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of an integer."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@numba.njit
def f32_to_f16_bits(x):
    """The one float32 -> float16 rounding of the backend (NaN: quiet, top payload bits)."""
    return _fptrunc_half_bits(x)


@numba.njit
def f16_bits_to_f32(h):
    """Exact float16 -> float32, NaN payloads kept as NumPy keeps them (a signalling NaN stays
    signalling: the quiet bit the hardware sets is cleared again)."""
    # signalling: exponent all ones, quiet bit clear, payload not 0 -- the magnitudes
    # 0x7C01..0x7DFF, one unsigned compare (the three separate tests cost a gather of f16 rows
    # ~20% on one thread: 4096 rows of 1,024 from 8,192, 0.90 -> 0.75 ms, medians of 40)
    magnitude = np.uint32(h) & np.uint32(0x7FFF)
    signalling = np.uint32(magnitude - np.uint32(0x7C01)) < np.uint32(0x1FF)
    quiet_bit = np.uint32(signalling) << np.uint32(22)  # branch-free: the loop vectorizes
    return _f32_from_bits(_fpext_half_bits(h) & ~quiet_bit)


def to_f32(v):  # pragma: no cover - typed by the overload below
    """An element of a float32 or float16-bits array as float32."""


@overload(to_f32)
def _to_f32(v):
    if v == types.uint16:
        return lambda v: f16_bits_to_f32(v)
    if v == types.float32:
        return lambda v: v
    return None


def from_f32(v, out):  # pragma: no cover - typed by the overload below
    """float32 v as an element of ``out`` (float32, or float16 bits: rounded once)."""


@overload(from_f32)
def _from_f32(v, out):
    if out.dtype == types.uint16:
        return lambda v, out: f32_to_f16_bits(v)
    if out.dtype == types.float32:
        return lambda v, out: v
    return None


def move(v, out):  # pragma: no cover - typed by the overload below
    """An element moved into ``out``'s type: unchanged bits when the types match."""


@overload(move)
def _move(v, out):
    if v == out.dtype:
        return lambda v, out: v
    if v == types.uint16 and out.dtype == types.float32:
        return lambda v, out: f16_bits_to_f32(v)
    if v == types.float32 and out.dtype == types.uint16:
        return lambda v, out: f32_to_f16_bits(v)
    return None


# -- waiting without the GIL (parallel's part threads) -----------------------------------------
# the x86 spin-wait hint (``pause``); other CPUs wait without a hint
_X86 = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def _fresh_load(typingctx, cell, index):
    """cell[index] of an int64 array, read from memory every time (an atomic load: a plain one
    is hoisted out of the waiting loop, which then never sees the change)."""
    if not (isinstance(cell, types.Array) and cell.dtype == types.int64
            and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element(context, builder, signature, args), "acquire", 8)

    return types.int64(cell, index), codegen


def _element(context, builder, signature, args):
    """The address of cell[index] (the intrinsics' arguments)."""
    data = context.make_array(signature.args[0])(context, builder, args[0]).data
    return builder.gep(data, [context.cast(builder, args[1], signature.args[1], types.intp)])


@intrinsic
def _cpu_pause(typingctx):
    """The CPU's spin-wait hint (x86 ``pause``): the waiting loop yields the core's pipeline."""

    def codegen(context, builder, signature, args):
        if _X86:
            pause = builder.module.declare_intrinsic(
                "llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(pause, [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _fetch_add(typingctx, cell, index):
    """cell[index] += 1 (int64) as one atomic step, returning the value before: two threads
    never get the same value.  A full barrier: what a thread wrote before it is seen by a
    thread that reads the new count with ``_fresh_load``."""
    if not (isinstance(cell, types.Array) and cell.dtype == types.int64
            and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", _element(context, builder, signature, args),
                                  ir.Constant(ir.IntType(64), 1), "acq_rel")

    return types.int64(cell, index), codegen


# A claimed split's counter: [next chunk to claim, chunks finished] (``parallel.run_claimed``)
@numba.njit(nogil=True, cache=True)
def claim_next(counter):
    """The index of the next chunk nobody has claimed (it may be past the last one)."""
    return _fetch_add(counter, 0)


@numba.njit(nogil=True, cache=True)
def post(posted):
    """posted[0] += 1: the part threads watching it look for a job (``parallel._Crew``)."""
    _fetch_add(posted, 0)


@numba.njit(nogil=True, cache=True)
def chunk_done(counter):
    """One more chunk finished: the caller returns once all are, without waiting for the
    threads that ran them to take the GIL back."""
    _fetch_add(counter, 1)


@numba.njit(nogil=True, cache=True)
def wait_for_change(cell, seen, rounds):
    """True as soon as cell[0] != seen, False after ``rounds`` looks; runs without the GIL."""
    for _ in range(rounds):
        if _fresh_load(cell, 0) != seen:
            return True
        _cpu_pause()
    return False


@numba.njit(nogil=True, cache=True)
def wait_for_count(cell, index, count, rounds):
    """True as soon as cell[index] >= count, False after ``rounds`` looks; without the GIL."""
    for _ in range(rounds):
        if _fresh_load(cell, index) >= count:
            return True
        _cpu_pause()
    return False


# -- data movement -----------------------------------------------------------------------------
@intrinsic
def _prefetch(typingctx, array, index):
    """A hint to bring the cache line of ``array``'s element ``index`` (flat, C order) into
    the cache, to be read; no effect on any result."""
    if not (isinstance(array, types.Array) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        address = builder.bitcast(_element(context, builder, signature, args),
                                  ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        hint = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]))
        # (address, 0: to read, 3: keep in every cache level, 1: data)
        builder.call(hint, [address, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.none(array, index), codegen


#: rows of a gather whose lines are asked for ahead of the row being moved: rows in a random
#: order defeat the hardware prefetcher at every row start (one thread, 4096 rows of 1,024 f16
#: from 8,192: 1.51 ms, 0.92-0.93 with the row 1 or 2 ahead asked for, 1.02 with half of it;
#: the scatter of SET_ROWS, asked to write ahead, stayed level: 1.81 -> 1.88, 1.69 -> 1.64 of
#: ggml)
ROWS_AHEAD = 2


@numba.njit(inline="always")
def _prefetch_row(table, row):
    """Every cache line of row ``row`` of a C-contiguous 2-D ``table``, to be read."""
    start, per_line = row * table.shape[1], max(1, 64 // table.itemsize)
    for offset in range(0, table.shape[1], per_line):
        _prefetch(table, start + offset)


@numba.njit(nogil=True, cache=True)
def convert_flat(src, dst):
    for i in range(src.size):
        dst[i] = move(src[i], dst)


LINE_BYTES = 64


@intrinsic
def _copy_line_streaming(typingctx, dst, dst_byte, src, src_byte):
    """The 64 bytes at ``src_byte`` of ``src`` into ``dst`` at ``dst_byte``, which must be
    64-byte aligned there, with a non-temporal store: written to memory without reading the
    line first or keeping it in the cache."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array)):
        return None

    def codegen(context, builder, signature, args):
        line = ir.VectorType(ir.IntType(8), LINE_BYTES)
        byte_pointer = ir.IntType(8).as_pointer()

        def at(array_type, array, offset):
            data = context.make_array(array_type)(context, builder, array).data
            address = builder.gep(builder.bitcast(data, byte_pointer), [offset])
            return builder.bitcast(address, line.as_pointer())

        value = builder.load(at(signature.args[2], args[2], args[3]), align=1)
        store = builder.store(value, at(signature.args[0], args[0], args[1]), align=LINE_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return types.none(dst, dst_byte, src, src_byte), codegen


@intrinsic
def _store_fence(typingctx):
    """Orders the non-temporal stores before it before anything after it (they are weakly
    ordered: another thread told "done" could otherwise read stale lines)."""
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@numba.njit(nogil=True, cache=True)
def copy_flat_streaming(src, dst):
    """dst[:] = src[:] (one dtype, contiguous), whole lines of dst written past the cache: a
    copy larger than the cache would evict what it writes anyway, and a normal store first
    reads each line it fills (a third of the traffic).  The bits are src's."""
    head = min(src.size, (-dst.ctypes.data) % LINE_BYTES // dst.itemsize)
    for i in range(head):  # up to dst's first line boundary
        dst[i] = src[i]
    byte, end = head * src.itemsize, src.size * src.itemsize
    while byte + LINE_BYTES <= end:
        _copy_line_streaming(dst, byte, src, byte)
        byte += LINE_BYTES
    for i in range(byte // src.itemsize, src.size):  # the part of a line left
        dst[i] = src[i]
    _store_fence()


@numba.njit(nogil=True, cache=True)
def gather_rows(src, rows, out):
    """out[r] = src[rows[r]] (2-D, rows of equal width), converted to out's type."""
    for r in range(len(rows)):
        if r + ROWS_AHEAD < len(rows):
            _prefetch_row(src, rows[r + ROWS_AHEAD])
        row = rows[r]
        for c in range(out.shape[1]):
            out[r, c] = move(src[row, c], out)


@numba.njit(nogil=True, cache=True)
def copy_rows_permuted(src, out, lead, strides, step_axis, step, lo, hi):
    """Source rows lo..hi of src [rows, width] (C order over the source's leading dims
    ``lead``) each into its row of out [rows', width], converted: a source index along axis k
    moves the out row by strides[k]; along step_axis only every step-th index is kept (as
    ``index // step``)."""
    for r in range(lo, hi):
        rest, row, kept = r, 0, True
        for k in range(len(lead) - 1, -1, -1):
            index = rest % lead[k]
            rest //= lead[k]
            if k == step_axis:
                kept = index % step == 0
                index //= step
            row += index * strides[k]
        if kept:
            source, target = src[r], out[row]
            for c in range(len(target)):
                target[c] = move(source[c], target)


# The claimed variants: every thread of a split calls one, and it runs chunks of ``chunk``
# items, claimed from ``counter`` one by one, until none is left, counting each it finishes;
# a thread that comes late takes fewer or none, and no thread waits for another
# (``parallel.run_claimed``).  Each first adds one to ``posted``, the cell the part threads
# watch for work: the caller posts its job from here, where it no longer holds the GIL, so a
# part thread that sees it gets the GIL at once instead of sleeping until the caller lets go.
@numba.njit(nogil=True, cache=True)
def convert_claimed(src, dst, counter, chunk, posted):
    """``convert_flat`` over claimed chunks of elements."""
    post(posted)
    while True:
        lo = claim_next(counter) * chunk
        if lo >= src.size:
            return
        convert_flat(src[lo:lo + chunk], dst[lo:lo + chunk])
        chunk_done(counter)


@numba.njit(nogil=True, cache=True)
def copy_streaming_claimed(src, dst, counter, chunk, posted):
    """``copy_flat_streaming`` over claimed chunks of elements."""
    post(posted)
    while True:
        lo = claim_next(counter) * chunk
        if lo >= src.size:
            return
        copy_flat_streaming(src[lo:lo + chunk], dst[lo:lo + chunk])
        chunk_done(counter)


@numba.njit(nogil=True, cache=True)
def gather_rows_claimed(src, rows, out, counter, chunk, posted):
    """``gather_rows`` over claimed chunks of out's rows."""
    post(posted)
    while True:
        lo = claim_next(counter) * chunk
        if lo >= len(rows):
            return
        gather_rows(src, rows[lo:lo + chunk], out[lo:lo + chunk])
        chunk_done(counter)


@numba.njit(nogil=True, cache=True)
def copy_rows_permuted_claimed(src, out, lead, strides, step_axis, step, counter, chunk,
                               posted):
    """``copy_rows_permuted`` over claimed chunks of src's rows."""
    post(posted)
    while True:
        lo = claim_next(counter) * chunk
        if lo >= len(src):
            return
        copy_rows_permuted(src, out, lead, strides, step_axis, step, lo,
                           min(lo + chunk, len(src)))
        chunk_done(counter)


@numba.njit(nogil=True, cache=True)
def scatter_rows(dst, src, slots):
    """dst[slots[r]] = src[r] where slots[r] >= 0, converted to dst's type."""
    for r in range(len(slots)):
        slot = slots[r]
        if slot >= 0:
            for c in range(src.shape[1]):
                dst[slot, c] = move(src[r, c], dst)


@numba.njit(nogil=True, cache=True)
def scatter_rows_claimed(dst, src, slots, counter, chunk, posted):
    """``scatter_rows`` over claimed chunks of src's rows."""
    post(posted)
    while True:
        lo = claim_next(counter) * chunk
        if lo >= len(slots):
            return
        scatter_rows(dst, src[lo:lo + chunk], slots[lo:lo + chunk])
        chunk_done(counter)


# -- ROPE --------------------------------------------------------------------------------------
@numba.njit(nogil=True, cache=True)
def rope_halves(x, rows, out, cos, sin):
    """neox/mrope: pairs (i, i + n/2) of [tokens, heads, n], token t's angles in row rows[t]
    of cos and sin; out must not alias x."""
    half = x.shape[2] // 2
    for t in range(x.shape[0]):
        row = rows[t]
        for h in range(x.shape[1]):
            for i in range(half):
                a = to_f32(x[t, h, i])
                b = to_f32(x[t, h, i + half])
                c = cos[row, i]
                s = sin[row, i]
                out[t, h, i] = from_f32(a * c - b * s, out)
                out[t, h, i + half] = from_f32(b * c + a * s, out)


@numba.njit(nogil=True, cache=True)
def rope_adjacent(x, rows, out, cos, sin):
    """normal mode: pairs (2i, 2i + 1), the complex product (a + ib)(c + is); angles as in
    ``rope_halves``."""
    for t in range(x.shape[0]):
        row = rows[t]
        for h in range(x.shape[1]):
            for i in range(x.shape[2] // 2):
                a = to_f32(x[t, h, 2 * i])
                b = to_f32(x[t, h, 2 * i + 1])
                c = cos[row, i]
                s = sin[row, i]
                out[t, h, 2 * i] = from_f32(a * c - b * s, out)
                out[t, h, 2 * i + 1] = from_f32(a * s + b * c, out)


@numba.njit(nogil=True, cache=True)
def rope_claimed(x, rows, out, cos, sin, adjacent, counter, chunk, posted):
    """``rope_adjacent`` (``adjacent``) or ``rope_halves`` over claimed chunks of tokens."""
    post(posted)
    while True:
        lo = claim_next(counter) * chunk
        if lo >= x.shape[0]:
            return
        hi = min(lo + chunk, x.shape[0])
        if adjacent:
            rope_adjacent(x[lo:hi], rows[lo:hi], out[lo:hi], cos, sin)
        else:
            rope_halves(x[lo:hi], rows[lo:hi], out[lo:hi], cos, sin)
        chunk_done(counter)


@numba.njit(nogil=True, cache=True)
def kv_rotate(cache, blocks, deltas, lut, interleaved):
    """In place: rotate every key of the blocks by LUT row deltas[r, token or 0];
    pairs (i, i + D/2) or, interleaved, (2i, 2i + 1)."""
    block_size, n_heads, d = cache.shape[1], cache.shape[2], cache.shape[3]
    half = d // 2
    step, other = (2, 1) if interleaved else (1, half)
    per_token = deltas.shape[1] > 1
    for r in range(len(blocks)):
        block = blocks[r]
        for t in range(block_size):
            row = deltas[r, t if per_token else 0]
            for h in range(n_heads):
                for i in range(half):
                    ia = i * step
                    a = to_f32(cache[block, t, h, ia])
                    b = to_f32(cache[block, t, h, ia + other])
                    c = lut[row, i]
                    s = lut[row, half + i]
                    cache[block, t, h, ia] = from_f32(a * c - b * s, cache)
                    cache[block, t, h, ia + other] = from_f32(b * c + a * s, cache)


@numba.njit(nogil=True, cache=True)
def kv_rotate_claimed(cache, blocks, deltas, lut, interleaved, counter, chunk, posted):
    """``kv_rotate`` over claimed chunks of the blocks (distinct: no two chunks write one)."""
    post(posted)
    while True:
        lo = claim_next(counter) * chunk
        if lo >= len(blocks):
            return
        kv_rotate(cache, blocks[lo:lo + chunk], deltas[lo:lo + chunk], lut, interleaved)
        chunk_done(counter)


# -- ATTN --------------------------------------------------------------------------------------
def value(v):  # pragma: no cover - typed by the overload below
    """An element of K or V as float32 for arithmetic (a NaN stays a NaN; its payload does not
    matter once it enters a sum)."""


@overload(value, inline="always")
def _value(v):
    if v == types.uint16:
        return lambda v: _f32_from_bits(_fpext_half_bits(v))
    if v == types.float32:
        return lambda v: v
    return None


@numba.njit(nogil=True, fastmath={"reassoc", "contract"})
def dot(q, i, h, key_row, kvh):
    """q[i, h] . key_row[kvh] in float32 (indices, not views: a view per call cost more than
    a short dot product).  Reassociated (the one fastmath loop): a serial chain of 128 adds
    waits on each add's latency, the vector form is ~10x faster.  The order is fixed by the
    compiled code, so the result does not depend on the thread count."""
    total = np.float32(0.0)
    for d in range(q.shape[2]):
        total += q[i, h, d] * value(key_row[kvh, d])
    return total


@numba.njit(nogil=True)
def add_scaled(p, value_row, kvh, acc, r):
    """acc[r] += p * value_row[kvh]."""
    for d in range(acc.shape[1]):
        acc[r, d] += p * value(value_row[kvh, d])


@numba.njit(nogil=True, cache=True)
def attend(q, k, v, table, q_pos, key_lo, key_hi, scal, mask, slopes, sinks, out, lse,
           q_block, key_chunk, n_chunks):
    """Online-softmax attention of one sequence, the whole call on this thread (one dispatch:
    a small call's cost is mostly numba's argument checks).

    q float32 [n_q, H, Dk]; k, v caches [num_blocks, block_size, Hkv, D] (float32 or float16
    bits), key j in block table[j // block_size]; key_lo/key_hi [n_q]: the visible keys of
    each query; scal = (scale, softcap, 1/softcap, causal, window); mask [n_q, n_kv], ALiBi
    slopes [H] and sinks [H] float32, each empty when absent (one compiled kernel, no None
    types); out float32 [n_q, H, Dv], lse float32 [n_q, H].  The work goes in units (query
    block of q_block, n_chunks key chunks of key_chunk): see ``attend_units``."""
    n_blocks = -(-q.shape[0] // q_block)
    rows = q.shape[1] * q_block
    units = n_blocks * n_chunks
    part_m, part_l = np.empty((units, rows), F32), np.empty((units, rows), F32)
    part_acc = np.empty((units, rows, out.shape[2]), F32)
    attend_units(q, k, v, table, q_pos, key_lo, key_hi, scal, mask, slopes, sinks,
                 part_m, part_l, part_acc, q_block, key_chunk, 0, units)
    combine(part_m, part_l, part_acc, q_block, out, lse)


@numba.njit(nogil=True, cache=True)
def attend_units(q, k, v, table, q_pos, key_lo, key_hi, scal, mask, slopes, sinks,
                 part_m, part_l, part_acc, q_block, key_chunk, lo, hi):
    """Units lo..hi of ``attend``'s call, numbered block-major (unit u: query block
    u // n_chunks, key chunk u % n_chunks); each leaves its rows' running max, sum and
    unnormalized output in part_m, part_l [units, H * q_block] and part_acc [units,
    H * q_block, Dv] for ``combine``.  A unit takes every head, so each key's row of heads is
    read once, in memory order (a pass per kv head reads rows a page apart: waiting on each
    page made a 4k-key decode 4x slower), and a decode splits over its keys: threads
    splitting the heads read interleaved halves of each row and went 1.1x faster than one,
    on key chunks 1.6x.  The chunks are fixed by the key count, so the bits do not depend on
    the thread count."""
    n_q = q.shape[0]
    s = np.empty((part_m.shape[1], KEY_TILE), F32)
    n_chunks = part_m.shape[0] // -(-n_q // q_block)
    for unit in range(lo, hi):
        block, chunk = unit // n_chunks, unit % n_chunks
        q0 = block * q_block
        queries = (q0, min(q_block, n_q - q0))
        first = max(key_lo[q0:q0 + queries[1]].min(), chunk * key_chunk)
        last = min(key_hi[q0:q0 + queries[1]].max(), (chunk + 1) * key_chunk)
        state = (s, part_m[unit], part_l[unit], part_acc[unit])
        _attend_chunk(q, k, v, table, q_pos, scal, (mask, slopes, sinks), queries,
                      (first, last), chunk == 0, state)


@numba.njit(nogil=True, cache=True)
def combine(part_m, part_l, part_acc, q_block, out, lse):
    """out [n_q, H, Dv] and lse [n_q, H] float32 from each query block's chunks, merged in
    chunk order (one chunk: its rows as they are)."""
    n_q, n_heads, dv = out.shape
    n_blocks = -(-n_q // q_block)
    n_chunks = part_m.shape[0] // n_blocks
    for block in range(n_blocks):
        q0 = block * q_block
        nq = min(q_block, n_q - q0)
        units = range(block * n_chunks, (block + 1) * n_chunks)
        for r in range(n_heads * nq):
            h, i = r // nq, q0 + r % nq
            m_all = -np.inf
            for u in units:
                m_all = max(m_all, part_m[u, r])
            m_safe = np.float32(0.0) if m_all == -np.inf else m_all  # all hidden
            total = np.float32(0.0)
            out[i, h, :] = 0.0
            for u in units:
                weight = np.float32(math.exp(part_m[u, r] - m_safe))
                total += part_l[u, r] * weight
                for d in range(dv):
                    out[i, h, d] += part_acc[u, r, d] * weight
            seen = total > 0
            denominator = total if seen else np.float32(1.0)
            for d in range(dv):
                out[i, h, d] /= denominator
            lse[i, h] = m_all + np.float32(math.log(denominator)) if seen else -np.inf


@numba.njit(inline="always")
def _attend_chunk(q, k, v, table, q_pos, scal, extras, queries, keys, first_chunk, state):
    """One query block against keys [first, last): rows r = head * nq + query."""
    mask, slopes, sinks = extras
    s, m, l_sum, acc = state
    nq = queries[1]
    n_rows = q.shape[1] * nq
    _init_rows(m, l_sum, acc, sinks if first_chunk else sinks[:0], nq, n_rows)
    for start in range(keys[0], keys[1], KEY_TILE):
        n = min(KEY_TILE, keys[1] - start)
        _tile_dots(q, k, table, queries, start, n, s)
        _finish_scores(q_pos, queries, start, n, scal, mask, slopes, s, n_rows)
        _softmax_step(s, m, l_sum, acc, n_rows, n)
        _accumulate(v, table, q.shape[1] // v.shape[2] * nq, start, n, s, acc, n_rows)


@numba.njit(inline="always")
def _init_rows(m, l_sum, acc, sinks, nq, n_rows):
    # a sink is one extra logit with no value: m = sink, l = 1 counts it once (in one chunk)
    for r in range(n_rows):
        if sinks.size == 0:
            m[r], l_sum[r] = -np.inf, 0.0
        else:
            m[r], l_sum[r] = sinks[r // nq], 1.0
        acc[r, :] = 0.0


@numba.njit(inline="always")
def _tile_dots(q, k, table, queries, start, n, s):
    """s[r, j] = q . k for the tile's keys, key by key."""
    q0, nq = queries
    group = q.shape[1] // k.shape[2]
    block_size = k.shape[1]
    for j in range(n):
        key = start + j
        key_row = k[table[key // block_size], key % block_size]  # [Hkv, Dk]
        for h in range(q.shape[1]):
            for i in range(nq):
                s[h * nq + i, j] = dot(q, q0 + i, h, key_row, h // group)


@numba.njit(inline="always")
def _finish_scores(q_pos, queries, start, n, scal, mask, slopes, s, n_rows):
    """Scaled, softcapped and masked scores."""
    scale, softcap, inv_softcap, causal, window = scal
    q0, nq = queries
    for r in range(n_rows):
        h, i = r // nq, q0 + r % nq
        for j in range(n):
            x = s[r, j] * scale
            if softcap > 0.0:
                x = np.float32(math.tanh(x * inv_softcap)) * softcap
            rel = start + j - q_pos[i]
            if (causal and rel > 0) or (window > 0 and -rel >= window):
                x = -np.inf
            elif mask.size:
                x += mask[i, start + j]
            if slopes.size:
                x += slopes[h] * np.float32(rel)
            s[r, j] = x


@numba.njit(inline="always")
def _softmax_step(s, m, l_sum, acc, rows, n):
    """Scores -> probabilities against the running max; rescale what was accumulated."""
    for r in range(rows):
        m_new = m[r]
        for j in range(n):
            m_new = max(m_new, s[r, j])
        m_safe = np.float32(0.0) if m_new == -np.inf else m_new  # all hidden: exp(-inf) = 0
        alpha = np.float32(math.exp(m[r] - m_safe))
        total = np.float32(0.0)
        for j in range(n):
            p = np.float32(math.exp(s[r, j] - m_safe))
            s[r, j] = p
            total += p
        l_sum[r] = l_sum[r] * alpha + total
        for d in range(acc.shape[1]):
            acc[r, d] *= alpha
        m[r] = m_new


@numba.njit(inline="always")
def _accumulate(v, table, rows_per_kv_head, start, n, s, acc, n_rows):
    """acc += p v over the tile's keys, key by key."""
    block_size = v.shape[1]
    for j in range(n):
        key = start + j
        value_row = v[table[key // block_size], key % block_size]  # [Hkv, Dv]
        for r in range(n_rows):
            add_scaled(s[r, j], value_row, r // rows_per_kv_head, acc, r)
