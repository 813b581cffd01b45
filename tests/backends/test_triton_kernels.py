"""Every Triton kernel, launched directly in interpreter mode, against the float64 oracles.

Tiny seeded shapes with tiles smaller than the data, so every branch runs: partial last tiles
(n_kv = 37 with 16-key tiles, 15 RoPE rows in tiles of 4), several sequences, GQA ratios 1, 2, 3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from opbench.harness.triton_testing import (
    assert_exact,
    assert_lse,
    assert_passes,
    guarded,
    guards_intact,
    require_triton,
    result,
    tt,
    uniform,
)
from opbench.protocol import AttnParams, PagedKV, RopeParams, dtype_name
from opbench.reference import attention as attn_ref
from opbench.reference import copies as copy_ref
from opbench.reference import kv_cache as kv_ref
from opbench.reference import rope as rope_ref


@pytest.fixture(scope="module")
def kernels():
    rope, attention, kv, copy = require_triton()
    return {"rope": rope, "attention": attention, "kv": kv, "copy": copy}


# -- launch sizes ---------------------------------------------------------------------------------
class InterpretedFunction:  # what ``interpreted`` looks for: a kernel in Triton's interpreter
    pass


@pytest.mark.parametrize("kernel, budget", [(object(), 1 << 12), (InterpretedFunction(), 1 << 16)])
def test_rows_per_program_is_the_largest_power_of_two_that_fits(kernels, kernel, budget):
    """``tl.arange`` compiles only for powers of two (the interpreter takes any length): head
    sizes 80 and 96 once gave 51 rows and failed every RoPE launch on a GPU."""
    from opbench.backends.triton.kernels_common import rows_per_program

    for row_block in (1, 3, 16, 80, 96, 100, 128, 200, 4096, 5000):
        for n_rows in (1, 2, 5, 51, 64, 1000, 100_000):
            rows = rows_per_program(kernel, n_rows, row_block)
            needed = 1 << (n_rows - 1).bit_length()  # rows past n_rows are masked off
            room = max(1, budget // row_block)  # one row at least, however wide
            assert rows & (rows - 1) == 0, (row_block, n_rows, rows)  # a power of two
            assert rows <= min(needed, room), (row_block, n_rows, rows)
            assert 2 * rows > min(needed, room), (row_block, n_rows, rows)  # the largest


# -- ROPE -----------------------------------------------------------------------------------------
ROPE_CASES = [  # (dtype, mode, head_dim, n_dims, yarn, freq_factors, inverse)
    ("f32", "normal", 16, 16, False, False, False),
    ("f32", "neox", 20, 8, True, True, True),  # partial rotation, odd pass-through tail
    ("f16", "normal", 20, 12, True, False, True),
    ("bf16", "neox", 16, 16, False, True, False),
    ("f32", "mrope", 16, 16, True, True, False),
    ("bf16", "mrope", 24, 24, False, False, True),
]


@pytest.mark.parametrize("dtype,mode,head_dim,n_dims,yarn,use_ff,inverse", ROPE_CASES)
def test_rope_matches_oracle(kernels, dtype, mode, head_dim, n_dims, yarn, use_ff, inverse):
    rng = np.random.default_rng(7)
    n_tokens, n_heads = 5, 3
    x = uniform(rng, (n_tokens, n_heads, head_dim), dtype)
    sections = (2, 3, 2, 1) if mode == "mrope" else None
    pos_shape = (4, n_tokens) if mode == "mrope" else (n_tokens,)
    pos = rng.integers(0, 3000, pos_shape).astype(np.int32)
    ff = rng.uniform(0.5, 4.0, n_dims // 2).astype(np.float32) if use_ff else None
    p = RopeParams(n_dims=n_dims, mode=mode, freq_base=1e4, freq_scale=0.25,
                   ext_factor=1.0 if yarn else 0.0, attn_factor=0.7, n_ctx_orig=4096,
                   sections=sections, inverse=inverse)
    out = guarded(x.shape, dtype)
    kernels["rope"].launch_rope(tt(x), tt(pos), tt(out.device_view), p, tt(ff), block_r=4)

    options = dict(n_dims=n_dims, mode=mode, freq_base=1e4, freq_scale=0.25,
                   ext_factor=p.ext_factor, attn_factor=0.7, n_ctx_orig=4096, freq_factors=ff,
                   sections=sections, inverse=inverse)
    expected = rope_ref.rope(x, pos, **options)
    low = rope_ref.rope(x, pos, dtype=np.float32, **options)
    assert_passes("ROPE", out, expected, low)
    assert_exact(x[..., n_dims:], result(out)[..., n_dims:])  # pass-through dims untouched
    assert guards_intact(out)


# -- ATTN -----------------------------------------------------------------------------------------
def _contiguous_inputs(rng, dtype, n_q, n_kv, heads, kv_heads, dk, dv):
    return (uniform(rng, (n_q, heads, dk), dtype), uniform(rng, (n_kv, kv_heads, dk), dtype),
            uniform(rng, (n_kv, kv_heads, dv), dtype))


def _paged_inputs(rng, dtype, kv_lens, q_lens, heads, kv_heads, dk, dv, block_size=4):
    n_blocks = [math.ceil(n / block_size) for n in kv_lens]
    num_blocks = sum(n_blocks) + 2  # spare blocks nobody may read
    order = rng.permutation(num_blocks).astype(np.int32)
    table = np.full((len(kv_lens), max(n_blocks) + 1), -1, np.int32)  # padded with -1
    start = 0
    for s, n in enumerate(n_blocks):
        table[s, :n] = order[start:start + n]
        start += n
    q = uniform(rng, (sum(q_lens), heads, dk), dtype)
    k = uniform(rng, (num_blocks, block_size, kv_heads, dk), dtype)
    v = uniform(rng, (num_blocks, block_size, kv_heads, dv), dtype)
    return q, k, v, table, np.array(kv_lens, np.int32), np.array(q_lens, np.int32)


def _run_attention(kernels, decode, q, k, v, p, *, mask=None, sinks=None, paged=None):
    out = guarded((q.shape[0], q.shape[1], v.shape[-1]), dtype_name(q.dtype))
    lse = guarded((q.shape[0], q.shape[1]), "f32")
    paged_t = None if paged is None else PagedKV(*(tt(a) for a in paged))
    args = (tt(q), tt(k), tt(v), tt(out.device_view), p, tt(mask), tt(sinks),
            tt(lse.device_view), paged_t)
    if decode:
        kernels["attention"].launch_decode(*args, block_n=16, split_len=16)
    else:
        kernels["attention"].launch_attention(*args, block_m=16, block_n=16)
    assert guards_intact(out) and guards_intact(lse)
    return out, result(lse)


def _oracle_options(p, sinks):
    return dict(scale=p.scale, causal=p.causal, window=p.window, softcap=p.softcap,
                max_bias=p.max_bias, sinks=sinks, return_lse=True)


ATTN_CASES = {  # name: (dtype, n_q, n_kv, H, Hkv, dk, dv, params, mask, sinks)
    "plain-tail": ("f32", 5, 37, 4, 2, 16, 16, {}, False, False),
    "causal-window": ("f32", 20, 37, 4, 2, 16, 16, {"causal": True, "window": 7}, False, False),
    "window-only": ("f16", 5, 37, 2, 1, 16, 16, {"window": 9}, False, False),
    "softcap-alibi-sinks-gqa3": ("f32", 5, 37, 6, 2, 16, 8,
                                 {"causal": True, "softcap": 1.0, "max_bias": 8.0}, False, True),
    "mask": ("f32", 5, 37, 4, 1, 16, 16, {}, True, False),
    "more-queries-than-keys": ("bf16", 7, 5, 3, 3, 16, 16, {}, False, False),
    "alibi-5-heads": ("bf16", 3, 21, 5, 5, 16, 16, {"causal": True, "max_bias": 8.0}, False,
                      False),
}


@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_flash_attention_matches_oracle(kernels, name):
    dtype, n_q, n_kv, heads, kv_heads, dk, dv, extra, use_mask, use_sinks = ATTN_CASES[name]
    rng = np.random.default_rng(11)
    q, k, v = _contiguous_inputs(rng, dtype, n_q, n_kv, heads, kv_heads, dk, dv)
    mask = None
    if use_mask:
        mask = rng.uniform(-2.0, 0.0, (n_q, n_kv))
        mask[rng.random((n_q, n_kv)) < 0.2] = -np.inf
        mask[1] = -np.inf  # a row that sees nothing: out 0, lse -inf
        mask = mask.astype(np.float32)
    sinks = rng.uniform(-2.0, 2.0, heads).astype(np.float32) if use_sinks else None
    p = AttnParams(scale=1.0 / math.sqrt(dk), **extra)
    out, lse = _run_attention(kernels, False, q, k, v, p, mask=mask, sinks=sinks)

    options = _oracle_options(p, sinks)
    expected, expected_lse = attn_ref.attention(q, k, v, mask=mask, **options)
    low, _ = attn_ref.attention(q, k, v, mask=mask, dtype=np.float32, **options)
    assert_passes("ATTN", out, expected, low)
    assert_lse(expected_lse, lse)


PAGED_CASES = {  # name: (dtype, kv_lens, q_lens, H, Hkv, params, sinks)
    "prefill-3-seqs": ("f32", [13, 9, 4], [5, 9, 1], 4, 2, {"causal": True, "max_bias": 8.0},
                       False),
    "prefill-window-sinks": ("f16", [23, 6], [7, 3], 3, 1, {"causal": True, "window": 5}, True),
}


@pytest.mark.parametrize("name", list(PAGED_CASES))
def test_paged_flash_attention_matches_oracle(kernels, name):
    dtype, kv_lens, q_lens, heads, kv_heads, extra, use_sinks = PAGED_CASES[name]
    rng = np.random.default_rng(5)
    q, k, v, table, seq_lens, q_lens = _paged_inputs(rng, dtype, kv_lens, q_lens, heads,
                                                     kv_heads, 16, 16)
    q_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    sinks = rng.uniform(-2.0, 2.0, heads).astype(np.float32) if use_sinks else None
    p = AttnParams(scale=0.25, **extra)
    out, lse = _run_attention(kernels, False, q, k, v, p, sinks=sinks,
                              paged=(table, seq_lens, q_start))

    options = _oracle_options(p, sinks)
    expected, expected_lse = attn_ref.paged_attention(q, k, v, table, seq_lens, q_lens, **options)
    low, _ = attn_ref.paged_attention(q, k, v, table, seq_lens, q_lens, dtype=np.float32,
                                      **options)
    assert_passes("ATTN", out, expected, low)
    assert_lse(expected_lse, lse)


DECODE_CASES = {  # name: (dtype, kv_lens or n_kv, H, Hkv, params, mask, sinks)
    "contiguous-window-sinks": ("f32", 37, 4, 2, {"causal": True, "window": 7}, False, True),
    "contiguous-mask-softcap-alibi": ("f32", 37, 4, 2, {"softcap": 1.0, "max_bias": 8.0}, True,
                                      False),
    "paged-3-seqs-sinks": ("bf16", [37, 5, 20], 4, 2, {"causal": True}, False, True),
    "paged-empty-splits": ("f16", [3, 33], 2, 2, {}, False, False),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_split_kv_decode_matches_oracle(kernels, name):
    """Splits of 16 keys: 37 keys make 3 partials (the last one partial), short sequences
    leave whole splits empty (lse -inf) that the merge must ignore."""
    dtype, lengths, heads, kv_heads, extra, use_mask, use_sinks = DECODE_CASES[name]
    rng = np.random.default_rng(3)
    sinks = rng.uniform(-2.0, 2.0, heads).astype(np.float32) if use_sinks else None
    p = AttnParams(scale=0.25, **extra)
    options = _oracle_options(p, sinks)
    if isinstance(lengths, list):
        q, k, v, table, seq_lens, q_lens = _paged_inputs(rng, dtype, lengths, [1] * len(lengths),
                                                         heads, kv_heads, 16, 16)
        q_start = np.arange(len(lengths) + 1, dtype=np.int32)
        out, lse = _run_attention(kernels, True, q, k, v, p, sinks=sinks,
                                  paged=(table, seq_lens, q_start))
        oracle = lambda dt: attn_ref.paged_attention(  # noqa: E731
            q, k, v, table, seq_lens, q_lens, dtype=dt, **options)
    else:
        q, k, v = _contiguous_inputs(rng, dtype, 1, lengths, heads, kv_heads, 16, 16)
        mask = None
        if use_mask:
            mask = rng.uniform(-2.0, 0.0, (1, lengths)).astype(np.float32)
            mask[0, 16:32] = -np.inf  # a whole split hidden
        out, lse = _run_attention(kernels, True, q, k, v, p, mask=mask, sinks=sinks)
        oracle = lambda dt: attn_ref.attention(q, k, v, mask=mask, dtype=dt,  # noqa: E731
                                               **options)
    (expected, expected_lse), (low, _) = oracle(np.float64), oracle(np.float32)
    assert_passes("ATTN", out, expected, low)
    assert_lse(expected_lse, lse)


class SmallSharedMemory:
    """A Triton kernel on a GPU with little shared memory: its compile refuses key tiles past
    16 (OutOfResources, raised before anything runs, as Triton's compile does), and with
    ``double_buffers_fit=False`` any pipelined (num_stages > 1) launch as well."""

    def __init__(self, kernel, double_buffers_fit=True) -> None:
        self.double_buffers_fit = double_buffers_fit  # another GPU: another name, fitted anew
        self.__name__ = f"small{'' if double_buffers_fit else '-single'}-{kernel.__name__}"
        self.kernel, self.tiles = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tiles.append((kwargs.get("BLOCK_M"), kwargs["BLOCK_N"],
                               kwargs.get("num_stages")))
            if kwargs["BLOCK_N"] > 16 or not (self.double_buffers_fit
                                              or kwargs.get("num_stages") == 1):
                import triton

                raise triton.runtime.errors.OutOfResources(344320, 232448, "shared memory")
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("double_buffers_fit", [True, False], ids=["tiles", "tiles+stages"])
@pytest.mark.parametrize("decode", [False, True], ids=["flash", "decode"])
def test_attention_tiles_shrink_to_what_the_gpu_holds(kernels, decode, double_buffers_fit):
    """Smaller key tiles, and then single buffering (MLA's f32 576/512 heads on the H200)."""
    module = kernels["attention"]
    small = SmallSharedMemory(module.decode_split_kernel if decode else
                              module.flash_attention_kernel, double_buffers_fit)
    rng = np.random.default_rng(13)
    q, k, v = _contiguous_inputs(rng, "f32", 1 if decode else 5, 37, 4, 2, 16, 16)
    p = AttnParams(scale=0.25, causal=True)
    options = _oracle_options(p, None)
    for _ in range(2):  # the second launch starts from the tiles that fitted
        out = guarded((q.shape[0], q.shape[1], 16), "f32")
        args = (tt(q), tt(k), tt(v), tt(out.device_view), p, None, None, None, None)
        if decode:
            module.launch_decode(*args, block_n=32, split_len=32, kernel=small)
        else:
            module.launch_attention(*args, block_m=32, block_n=32, kernel=small)
        expected, _ = attn_ref.attention(q, k, v, **options)
        low, _ = attn_ref.attention(q, k, v, dtype=np.float32, **options)
        assert_passes("ATTN", out, expected, low)
    block_m = None if decode else 32
    asked = [(block_m, 32, None), (block_m, 16, None)]  # block_n first
    if double_buffers_fit:
        fits = [(block_m, 16, None)]
        asked = asked[:1]
    else:  # then block_m (the flash kernel's), then the stages
        smallest_m = None if decode else 16
        asked += [] if decode else [(smallest_m, 16, None)]
        fits = [(smallest_m, 16, 1)]
    assert small.tiles == asked + fits + fits  # the second launch starts from what fitted


def test_attention_that_fits_no_tile_raises_the_gpus_error(kernels):
    import triton

    module = kernels["attention"]

    def never(**tiles):
        raise triton.runtime.errors.OutOfResources(1 << 20, 232448, "shared memory")

    q = tt(np.zeros((1, 1, 16), np.float32))
    with pytest.raises(triton.runtime.errors.OutOfResources):
        module.launch_fitting(never, q, q, q, {"block_m": 64, "block_n": 64}, never)


def test_decode_merge_is_the_oracles_merge_partials(kernels):
    """The split partials (out_p, lse_p) merged by the kernel equal merge_partials of the
    oracle's attention over the same key ranges."""
    rng = np.random.default_rng(9)
    q, k, v = _contiguous_inputs(rng, "f32", 1, 40, 2, 2, 16, 16)
    sinks = np.array([0.5, -1.0], np.float32)
    p = AttnParams(scale=0.25)
    out, lse = _run_attention(kernels, True, q, k, v, p, sinks=sinks)
    parts = [attn_ref.attention(q, k[a:b], v[a:b], scale=0.25, return_lse=True,
                                q_pos=[39], k_pos=np.arange(a, b)) for a, b in
             ((0, 16), (16, 32), (32, 40))]
    merged, merged_lse = attn_ref.merge_partials([o for o, _ in parts], [x for _, x in parts],
                                                 sinks)
    np.testing.assert_allclose(result(out), merged, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, merged_lse, rtol=1e-6, atol=1e-6)


# -- KV_ROTATE ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,layout,per_token", [
    ("f32", "rotate_half", False), ("f32", "interleaved", True),
    ("f16", "interleaved", False), ("bf16", "rotate_half", True),
])
def test_kv_rotate_matches_oracle(kernels, dtype, layout, per_token):
    rng = np.random.default_rng(13)
    num_blocks, block_size, kv_heads, head_dim, lut_rows = 6, 6, 2, 12, 9
    cache = uniform(rng, (num_blocks, block_size, kv_heads, head_dim), dtype)
    blocks = np.array([4, 0, 3], np.int32)
    width = block_size if per_token else 1
    deltas = rng.integers(0, lut_rows, (len(blocks), width)).astype(np.int32)
    lut = kv_ref.rotation_lut(lut_rows, head_dim, block_size, 10000.0)
    target = guarded(cache.shape, dtype, init=cache)
    # 4-token tiles over 6-token blocks: the second tile of every block is partial
    kernels["kv"].launch_kv_rotate(tt(target.device_view), tt(blocks), tt(deltas), tt(lut),
                                   layout, block_t=4)

    options = dict(layout=layout)
    expected = kv_ref.rotate_keys(cache, blocks, deltas, lut, **options)
    low = kv_ref.rotate_keys(cache, blocks, deltas, lut, dtype=np.float32, **options)
    assert_passes("KV_ROTATE", target, expected, low)
    untouched = [b for b in range(num_blocks) if b not in blocks]
    assert_exact(cache[untouched], result(target)[untouched])
    assert guards_intact(target)


# -- SET_ROWS / GET_ROWS / CPY --------------------------------------------------------------------
CONVERSIONS = [("f32", "f32"), ("f32", "bf16"), ("f32", "f16"), ("bf16", "f16"), ("f16", "bf16")]


@pytest.mark.parametrize("src_dtype,dst_dtype", CONVERSIONS)
def test_set_rows_is_bit_exact(kernels, src_dtype, dst_dtype):
    rng = np.random.default_rng(17)
    dst = uniform(rng, (9, 3, 5), dst_dtype)
    src = uniform(rng, (4, 3, 5), src_dtype)
    slots = np.array([7, -1, 0, 3], np.int32)  # -1 skips its row
    target = guarded(dst.shape, dst_dtype, init=dst)
    kernels["copy"].launch_set_rows(tt(target.device_view), tt(src), tt(slots), block=8)
    assert_passes("SET_ROWS", target, copy_ref.set_rows(dst, src, slots), type_src=src_dtype)
    assert guards_intact(target)


@pytest.mark.parametrize("src_dtype,dst_dtype", CONVERSIONS)
def test_get_rows_is_bit_exact(kernels, src_dtype, dst_dtype):
    rng = np.random.default_rng(19)
    src = uniform(rng, (7, 2, 9), src_dtype)
    rows = np.array([6, 0, 6, 2, 5], np.int32)
    out = guarded((5, 2, 9), dst_dtype)
    kernels["copy"].launch_get_rows(tt(src), tt(rows), tt(out.device_view), block=8)
    assert_passes("GET_ROWS", out, copy_ref.get_rows(src, rows, dst_dtype),
                  type_src=src_dtype)
    assert guards_intact(out)


@pytest.mark.parametrize("src_dtype,dst_dtype", CONVERSIONS)
@pytest.mark.parametrize("perm,step", [((0, 1, 2), 1), ((2, 0, 1), 2), ((1, 0), 3)])
def test_cpy_is_bit_exact(kernels, src_dtype, dst_dtype, perm, step):
    rng = np.random.default_rng(23)
    src = uniform(rng, (5, 6, 7)[: len(perm)], src_dtype)
    expected = copy_ref.cpy(src, dst_dtype, perm, step)
    out = guarded(expected.shape, dst_dtype)
    kernels["copy"].launch_cpy(tt(src), tt(out.device_view), perm, step, block=16)
    assert_passes("CPY", out, expected, type_src=src_dtype)
    assert guards_intact(out)


def test_cpy_index_plan_takes_the_cheapest_exact_indexing(kernels):
    plan = kernels["copy"].cpy_index_plan
    assert plan((1, 5, 6, 7), (0, 42, 7, 1), (0, 42, 7, 1)) == {"CONTIGUOUS": True,
                                                                    "WIDE": False}
    assert plan((1, 5, 1, 7), (0, 7, 999, 1), (0, 7, 7, 1))["CONTIGUOUS"]  # a size-1 dim
    assert not plan((1, 5, 6, 7), (0, 1, 5, 30), (0, 42, 7, 1))["CONTIGUOUS"]  # permuted
    assert not plan((1, 5, 6, 7), (0, 84, 14, 2), (0, 42, 7, 1))["CONTIGUOUS"]  # stepped
    limit = 1 << 31
    flat = lambda n: plan((1, 1, 1, n), (0, 0, 0, 1), (0, 0, 0, 1))["WIDE"]  # noqa: E731
    assert not flat(limit - 1) and flat(limit)
    offset = lambda stride: plan((1, 1, 2, 2), (0, 0, stride, 1),  # noqa: E731
                                 (0, 0, 2, 1))["WIDE"]
    assert not offset(limit - 2) and offset(limit - 1)  # the source's last offset is 2**31


def test_cpy_launch_indexes_dense_copies_flat_and_the_rest_in_32_bits(kernels):
    module, seen = kernels["copy"], []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((kwargs["CONTIGUOUS"], kwargs["WIDE"]))
                return module.cpy_kernel[grid](*args, **kwargs)
            return launch

    rng = np.random.default_rng(31)
    src = uniform(rng, (5, 6, 7), "f32")
    for perm in ((0, 1, 2), (2, 0, 1)):
        expected = copy_ref.cpy(src, "f16", perm, 1)
        out = guarded(expected.shape, "f16")
        module.launch_cpy(tt(src), tt(out.device_view), perm, 1, block=16, kernel=Spy())
        assert_passes("CPY", out, expected, type_src="f32")
    assert seen == [(True, False), (False, False)]


def test_bf16_store_rounds_to_nearest_even(kernels):
    """Ties, carries into the exponent, infinities and NaN: bit-identical to ml_dtypes (the
    interpreter's own float32 -> bfloat16 cast truncates, a GPU rounds)."""
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3FFF8000, 0x7F7FFFFF, 0x7F800000,
                     0xFF800000, 0x00008000, 0x80018000, 0x7FC00001], np.uint32)
    src = bits.view(np.float32)
    out = guarded(src.shape, "bf16")
    kernels["copy"].launch_cpy(tt(src), tt(out.device_view), (0,), 1, block=16)
    expected = copy_ref.round_to(src, "bf16")
    assert np.array_equal(expected.view(np.uint16), result(out).view(np.uint16))


def test_set_rows_writes_through_a_strided_view(kernels):
    """A cache viewed with a head slice: rows are not contiguous, the rest stays untouched."""
    rng = np.random.default_rng(29)
    cache = uniform(rng, (6, 4, 8), "f16")
    src = uniform(rng, (3, 2, 8), "f32")
    slots = np.array([5, 1, -1], np.int32)
    view = cache[:, 1:3, :]  # heads 1..2 of every slot
    expected = cache.copy()
    expected[:, 1:3, :] = copy_ref.set_rows(view, src, slots)
    kernels["copy"].launch_set_rows(tt(view), tt(src), tt(slots), block=8)
    assert_exact(expected, cache)


# -- ring attention's merge -----------------------------------------------------------------------
def test_attn_merge_matches_merge_partials(kernels):
    """In place (out, lse) <- merge with a part; rows where one side saw nothing (lse -inf,
    out NaN) must ignore that side, and a row where neither saw anything stays out 0, lse -inf."""
    rng = np.random.default_rng(31)
    n_q, heads, dv = 4, 3, 5
    out, part = rng.uniform(-1, 1, (2, n_q, heads, dv)).astype(np.float32)
    lse, part_lse = rng.uniform(-2, 2, (2, n_q, heads)).astype(np.float32)
    lse[1, 0] = -np.inf
    out[1, 0] = np.nan
    part_lse[2, 1] = -np.inf
    part[2, 1] = np.nan
    lse[3, 2] = part_lse[3, 2] = -np.inf
    expected, expected_lse = attn_ref.merge_partials([out, part], [lse, part_lse])
    kernels["attention"].launch_attn_merge(tt(out), tt(lse), tt(part), tt(part_lse), block_r=8)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    assert_lse(expected_lse, lse)
